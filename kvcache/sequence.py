"""What the handoff carries: one prefilled sequence's KV cache, and where it came from.

`prefill_sequence` is the one place a prompt is prefilled for export: on the prefill mesh
(`model/prefill.py`), whose cache stays on its devices until the serializer or a transport reads it.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import xxhash
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvcache.layout import PrefillKVLayout
from mesh.axes import COL, ROW
from mesh.errors import WaferError
from mesh.executors import Executor, Grid, make_core_mesh
from model.config import ModelConfig
from model.load import config_to_json
from model.prefill import PrefillResult, Prefiller
from model.sampling import Sampling
from model.wafer_layout import tensor_parallel_layout
from model.weights import Params, flatten_params


@dataclasses.dataclass(frozen=True)
class SequenceKV:
    """One sequence's cache in the prefill layout, with what decoding it needs next.

    k_LKSH, v_LKSH: L arrays [K_col, S, H] as `layout` says (KV heads padded to a multiple of the
      prefill mesh's columns): numpy arrays of any strides, or jax arrays sharded over the
      devices of the sequence's prefill-mesh row.
    """

    k_LKSH: tuple
    v_LKSH: tuple
    length: int  # S: positions 0..S-1 hold the prompt
    first_token: int  # the token sampled at prefill: the first one decode feeds
    layout: PrefillKVLayout

    def __post_init__(self):
        if len(self.k_LKSH) != len(self.v_LKSH) or not self.k_LKSH:
            raise WaferError(f"a cache needs as many K as V layers (at least one), got "
                             f"{len(self.k_LKSH)} and {len(self.v_LKSH)}")
        want = (self.layout.padded_heads, self.length)
        for a in self.k_LKSH + self.v_LKSH:
            if a.ndim != 3 or tuple(a.shape[:2]) != want:
                raise WaferError(f"cache layer of shape {tuple(a.shape)}; the layout needs [{want[0]}, {want[1]}, H]")

    @property
    def n_layers(self) -> int:
        return len(self.k_LKSH)

    @property
    def head_dim(self) -> int:
        return self.k_LKSH[0].shape[2]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.k_LKSH[0].dtype)

    def host_shards(self, a) -> list[np.ndarray]:
        """One layer's per-column shards [kc, S, H] on the host, without copies where possible."""
        kc = self.layout.kc
        if isinstance(a, jax.Array) and len(a.sharding.device_set) > 1:
            if not a.is_fully_addressable:
                raise WaferError("the cache spans processes; serialize it from the process that holds it")
            by_start = {s.index[0].start or 0: s for s in a.addressable_shards}
            return [np.asarray(by_start[c * kc].data) for c in range(self.layout.grid.cols)]
        host = np.asarray(a)
        return [host[c * kc:(c + 1) * kc] for c in range(self.layout.grid.cols)]

    def logical_layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer` as logical [K, S, H] arrays (a copy; for tests and references)."""
        return tuple(self.layout.to_logical(self.host_shards(a[layer])) for a in (self.k_LKSH, self.v_LKSH))


def model_fingerprint(config: ModelConfig, params: Params) -> str:
    """xxh3-128 over the config and every weight's bytes: a cache only decodes on its own model.

    The weights are hashed rounded to bfloat16, so the same model loaded in float32 or bfloat16
    has one fingerprint and a cache made in one dtype can be converted into the other (the stream's
    dtype is checked on its own, kvcache/landing.py). A float16 load rounds differently (twice), so
    it matches only float16 loads.
    """
    h = xxhash.xxh3_128(config_to_json(config).encode())
    for name, w in sorted(flatten_params(params).items()):
        w = np.asarray(w)
        if w.dtype != np.float16:
            w = w.astype(ml_dtypes.bfloat16)
        w = np.ascontiguousarray(w)
        h.update(f"{name}|{w.shape}".encode())
        h.update(w.reshape(-1).view(np.uint8))
    return h.hexdigest()


def place_on_prefill_mesh(a_KSH: np.ndarray, layout: PrefillKVLayout, devices: list) -> jax.Array:
    """[K_col, S, H] in the prefill layout (heads padded) -> a jax array of it, KV heads over the
    C devices of the layout's row of the prefill mesh laid over `devices`."""
    grid = layout.grid
    if len(devices) < grid.cores:
        raise WaferError(f"prefill mesh {grid} needs {grid.cores} devices, {len(devices)} available")
    if a_KSH.shape[0] != layout.padded_heads:
        raise WaferError(f"cache layer of {a_KSH.shape[0]} KV heads; the layout pads to {layout.padded_heads}")
    row = np.array(devices[: grid.cores], dtype=object).reshape(grid.rows, grid.cols)[layout.row]
    mesh = Mesh(row.reshape(1, grid.cols), (ROW, COL))
    sharding = NamedSharding(mesh, P(COL, None, None))  # KV heads over columns; S and H local
    return jax.make_array_from_callback(a_KSH.shape, sharding, lambda idx: a_KSH[idx])


def sequence_from_prefill(result: PrefillResult, i: int) -> SequenceKV:
    """Sequence i of a prefill-mesh result (`model.prefill.PrefillResult`) as a `SequenceKV`.

    On a `devices` prefill mesh the layers stay where the prefill left them: each is a jax array
    [K_col, S, H] over the C devices of the sequence's mesh row, built from views of those
    devices' shards (no host copy; the serializer and JAX transfer read the shards). On `vcores`
    (one device) they are host arrays.

    The wire layout (`PrefillKVLayout`: KV head c*kc + i on column c) is the prefill cache's
    below 2K columns. From 2K on the prefill replicates each KV head over rep columns
    (`tensor_parallel_layout`): wire column h < K takes KV head h from its first copy (a copy
    between devices where that copy lies on another column), columns >= K are zero padding.
    """
    R, C, b, kc = result.k_cache[0].shape[:4]
    n, row, j = int(result.lengths[i]), i // b, i % b
    K = result.config.n_kv_heads
    layout = PrefillKVLayout(result.grid, K, row=row)
    H = result.config.head_dim
    sources = tensor_parallel_layout(result.config, C).kv_head_sources
    if sources == tuple((h // kc, h % kc) for h in range(K)):  # whole groups: the wire's own layout
        column_of = None
    elif kc == layout.kc == 1:  # replicated KV heads: wire column h reads prefill column sources[h]
        column_of = [sources[c][0] if c < K else None for c in range(C)]
    else:
        raise WaferError(f"prefill cache of {kc} KV heads per column on {C} columns has no wire layout")

    def sequence_layer(a: jax.Array):
        if len(a.sharding.device_set) == 1:
            host = np.asarray(a[row, :, j, :, :n])  # [C, kc, n, H]
            if column_of is not None:
                host = np.stack([host[c] if c is not None else np.zeros_like(host[0]) for c in column_of])
            return host.reshape(C * kc, n, H)
        by_core = {(s.index[0].start or 0, s.index[1].start or 0): s for s in a.addressable_shards}
        devices = [by_core[(row, c)].device for c in range(C)]
        pieces = [by_core[(row, c)].data[0, 0, j, :, :n] for c in range(C)]
        if column_of is not None:
            pieces = [jax.device_put(pieces[src], d) if src is not None else
                      jax.device_put(np.zeros(pieces[0].shape, pieces[0].dtype), d)
                      for src, d in zip(column_of, devices)]
        mesh = Mesh(np.array(devices, dtype=object).reshape(1, C), (ROW, COL))
        return jax.make_array_from_single_device_arrays((C * kc, n, H), NamedSharding(mesh, P(COL, None, None)),
                                                        pieces)
    return SequenceKV(tuple(map(sequence_layer, result.k_cache)), tuple(map(sequence_layer, result.v_cache)), n,
                      int(result.first_tokens[i]), layout)


def prefill_sequence(params: Params, config: ModelConfig, prompt: list[int], sampling: Sampling | None = None,
                     prefill_grid: Grid | None = None) -> SequenceKV:
    """Prefill one prompt on a prefill mesh (`model.prefill`; default one device) for export."""
    mesh = make_core_mesh(prefill_grid or Grid(1, 1), Executor.DEVICES)
    result = Prefiller(params, config, mesh).prefill([prompt], sampling or Sampling())
    return sequence_from_prefill(result, 0)
