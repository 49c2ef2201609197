"""A decode batch of slots on a core mesh: the model planned, tiled and placed, and the protocol a
serving loop drives (reserve, place_layer, commit, abort, evict, insert, step).

A prefilled sequence is placed into a free slot (its cache moved into the decode layout,
cache_layout.py), decodes alongside the others in the per-core step (wafer_decode.py), and is
evicted when finished.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kernels.allreduce import Schedule
from mesh.errors import WaferError
from mesh.executors import CoreMesh
from mesh.extent import round_up
from mesh.planner import plan_sram
from mesh.wafer import WaferSpec, emulated_spec
from model.cache_layout import decode_kv_layout
from model.config import ModelConfig
from model.generate import CACHE_BUCKET
from model.sampling import Sampling, place_knobs
from model.wafer_decode import MeshOptions, core_decode_step
from model.wafer_layout import LayoutMode, WaferLayout, tile_params
from model.weights import Params, params_dtype

# Budget of an unconstrained plan (the accounting still happens).
UNLIMITED_BUDGET = 1 << 62


def core_copy(a: jax.Array) -> np.ndarray:
    """One core's copy of a value that every core holds alike, on the host: [R, C, ...] -> [...].

    Reads the first shard local to this process (one device-to-host copy, no dispatch), never the
    whole array, which on a mesh spanning processes lies partly on devices this process cannot read.
    """
    return np.asarray(a.addressable_data(0))[0, 0]


class SlotBatch:
    """A decode batch of `batch` slots on a core mesh."""

    def __init__(self, params: Params, config: ModelConfig, core_mesh: CoreMesh, batch: int, max_len: int,
                 opts: MeshOptions = MeshOptions(), spec: WaferSpec | None = None,
                 mode: LayoutMode = LayoutMode.AUTO):
        """Plan, tile and place the model; `spec` sets the per-core budget (default: no limit),
        `mode` how heads lie over the columns (model/wafer_layout.py)."""
        if batch < 1:
            raise WaferError(f"decode batch must be at least 1, got {batch}")
        self.config, self.core_mesh, self.batch, self.opts = config, core_mesh, batch, opts
        self.layout = WaferLayout(config, core_mesh.grid, round_up(max_len, CACHE_BUCKET), mode=mode)
        self.kv_layout = decode_kv_layout(self.layout)  # one slot's cache on the cores
        grid = core_mesh.grid
        # Planning comes first: a layout that does not fit fails before anything is allocated.
        self.dtype = params_dtype(params)  # of the weights, the activations and the cache
        specs = self.layout.tensor_specs(batch, self.dtype.name)
        self.plan = plan_sram(specs, grid.rows, grid.cols, spec or emulated_spec(UNLIMITED_BUDGET),
                              self.layout.useful_bytes(specs))
        self.params = params  # single-device weights: the model's fingerprint, the prefill
        self.tiles = core_mesh.place(tile_params(params, self.layout))
        shape = (batch, self.layout.kc, self.layout.s_slots, self.layout.hc)
        self.k_cache = tuple(core_mesh.zeros(shape, self.dtype) for _ in range(config.n_layers))
        self.v_cache = tuple(core_mesh.zeros(shape, self.dtype) for _ in range(config.n_layers))
        self.tokens = np.zeros(batch, np.int32)
        self.pos = np.zeros(batch, np.int32)
        self.active = np.zeros(batch, bool)
        self._sampling = [Sampling()] * batch  # each slot's own, set when a sequence is committed
        self.use_schedule(opts.schedule)
        self._logits = None
        self._active_placed = None
        self._knobs_placed: dict[Sampling, list] = {}  # one Sampling for every slot
        self._slot_knobs_placed = None  # each slot's knobs on the cores; None: to be placed again
        self._landing: dict[int, _Landing] = {}  # reserved slots, filled layer by layer

    def use_schedule(self, schedule: Schedule) -> None:
        """Reduce with `schedule` from the next step on (the step compiles again)."""
        self.opts = dataclasses.replace(self.opts, schedule=schedule)
        program = functools.partial(core_decode_step, layout=self.layout, opts=self.opts,
                                    executor=self.core_mesh.executor)
        self._step = jax.jit(self.core_mesh.run(program), donate_argnums=(1, 2))
        self._compiled_step = None

    @property
    def capacity(self) -> int:
        """Cache positions each slot holds (prompt and generated tokens together)."""
        return self.kv_layout.capacity

    def _replicate(self, a) -> jax.Array:
        """A per-sequence value as every core's copy: [R, C, ...]."""
        return self.core_mesh.broadcast(a)

    def slot_sampling(self, slot: int) -> Sampling:
        """How the sequence in `slot` (or the last one there) chooses its tokens."""
        return self._sampling[slot]

    def free_slots(self) -> list[int]:
        """Slots neither decoding nor reserved for a sequence being placed."""
        return [b for b in range(self.batch) if not self.active[b] and b not in self._landing]

    def insert(self, slot: int, k_LKSH, v_LKSH, length: int, next_token: int,
               sampling: Sampling | None = None) -> None:
        """Place one prefilled sequence (its cache, length, next token and how its tokens are chosen,
        see `reserve`) into a free slot."""
        self._check_dtype(*k_LKSH, *v_LKSH)
        self.reserve(slot, length, next_token, sampling)
        try:
            per_core_k = [self.kv_layout.to_cores(np.asarray(k)[:, :length]) for k in k_LKSH]
            per_core_v = [self.kv_layout.to_cores(np.asarray(v)[:, :length]) for v in v_LKSH]
            self.k_cache, self.v_cache = _insert_slot(self.k_cache, self.v_cache,
                                                      self.core_mesh.place(tuple(per_core_k)),
                                                      self.core_mesh.place(tuple(per_core_v)), jnp.int32(slot))
            self._landing[slot].placed.update(range(self.config.n_layers))
        except BaseException:
            self.abort(slot)
            raise
        self.commit(slot)

    def reserve(self, slot: int | None, length: int, next_token: int, sampling: Sampling | None = None) -> int:
        """Reserve a free slot (`None`: the first free one) for a sequence placed layer by layer.

        `sampling` (default greedy) chooses the sequence's tokens in the steps that use each slot's
        own (`step()`); a sampled one needs a decoder built with `MeshOptions(greedy=False)`.
        The slot stays inactive until `commit`: decode steps of the other slots never write its
        positions (an inactive slot writes only the scratch slot), so layers placed while they
        keep decoding stay as placed. Returns the slot.
        """
        if slot is None:
            free = self.free_slots()
            if not free:
                raise WaferError(f"no free slot in the decode batch of {self.batch}")
            slot = free[0]
        if not 0 <= slot < self.batch:
            raise WaferError(f"slot {slot} is outside the decode batch of {self.batch}")
        if self.active[slot] or slot in self._landing:
            raise WaferError(f"slot {slot} is occupied")
        if not 1 <= length < self.capacity:
            raise WaferError(f"sequence of {length} tokens leaves no room in a cache of {self.layout.max_len}")
        if not 0 <= next_token < self.config.vocab_size:
            raise WaferError(f"next token {next_token} is outside the vocabulary [0, {self.config.vocab_size})")
        sampling = Sampling() if sampling is None else sampling
        self._check_compiled_for(sampling)
        self._landing[slot] = _Landing(length, next_token, sampling, set())
        return slot

    def place_layer(self, slot: int, layer: int, k_KSH, v_KSH) -> None:
        """Place layer `layer` ([K, S, H] keys and values) of the sequence reserved in `slot`."""
        landing = self._landing.get(slot)
        if landing is None:
            raise WaferError(f"slot {slot} is not reserved")
        if not 0 <= layer < self.config.n_layers:
            raise WaferError(f"layer {layer} is outside the model's {self.config.n_layers}")
        want = (self.config.n_kv_heads, landing.length, self.config.head_dim)
        if tuple(k_KSH.shape) != want or tuple(v_KSH.shape) != want:
            raise WaferError(f"layer {layer}: K {tuple(k_KSH.shape)} / V {tuple(v_KSH.shape)}, expected {want}")
        self._check_dtype(k_KSH, v_KSH)
        k_new, v_new = self.core_mesh.place((self.kv_layout.to_cores(np.asarray(k_KSH)),
                                             self.kv_layout.to_cores(np.asarray(v_KSH))))
        k, v = _insert_layer(self.k_cache[layer], self.v_cache[layer], k_new, v_new, jnp.int32(slot))
        self.k_cache = self.k_cache[:layer] + (k,) + self.k_cache[layer + 1:]
        self.v_cache = self.v_cache[:layer] + (v,) + self.v_cache[layer + 1:]
        landing.placed.add(layer)

    def _check_dtype(self, *arrays) -> None:
        """Refuse a cache in another dtype than this batch's: the caller converts explicitly."""
        for a in arrays:
            if np.dtype(a.dtype) != self.dtype:
                raise WaferError(f"cache dtype {np.dtype(a.dtype).name} differs from the decode batch's "
                                 f"{self.dtype.name}; convert it explicitly")

    def commit(self, slot: int) -> None:
        """Start decoding the sequence reserved in `slot` (every layer must have been placed)."""
        landing = self._landing.get(slot)
        if landing is None:
            raise WaferError(f"slot {slot} is not reserved")
        missing = sorted(set(range(self.config.n_layers)) - landing.placed)
        if missing:
            raise WaferError(f"slot {slot}: layers {missing[:8]} were never placed")
        del self._landing[slot]
        self.tokens[slot], self.pos[slot], self.active[slot] = landing.next_token, landing.length, True
        if landing.sampling != self._sampling[slot]:
            self._sampling[slot], self._slot_knobs_placed = landing.sampling, None

    def abort(self, slot: int) -> None:
        """Give a reserved slot back. Layers already placed stay in its cache rows unseen: the slot
        is inactive, and the next insert overwrites every position of it."""
        self._landing.pop(slot, None)

    def evict(self, slot: int) -> None:
        self.active[slot] = False

    def step(self, sampling: Sampling | None = None) -> np.ndarray:
        """Decode one token for every active slot; returns the tokens [B] (inactive: unchanged).

        `sampling`: None, each slot chooses with its own (`reserve`); given, every slot with it.
        """
        tok, pos = self.step_device(sampling)
        self.tokens, self.pos = np.array(core_copy(tok)), np.array(core_copy(pos))
        return self.tokens.copy()

    def step_device(self, sampling: Sampling | None = None, tokens=None, pos=None):
        """Dispatch one step without reading back; returns device (tokens, positions) [R, C, B].

        `sampling` as in `step`.
        """
        if sampling is None:
            knobs = self._slot_knobs()
        else:
            self._check_compiled_for(sampling)
            knobs = self._knobs(sampling)
        tokens = self._replicate(self.tokens) if tokens is None else tokens
        pos = self._replicate(self.pos) if pos is None else pos
        args = (self.tiles, self.k_cache, self.v_cache, tokens, pos, self._device_active(), *knobs)
        self.compile()
        tok, new_pos, self.k_cache, self.v_cache, self._logits = self._compiled_step(*args)
        return tok, new_pos

    def last_logits(self) -> np.ndarray:
        """Logits [B, V] of the last step, gathered from the column shards of row 0."""
        # On a mesh spanning processes, other processes' cores hold shards this one cannot read.
        shards = multihost_utils.process_allgather(self._logits, tiled=True)[0]  # [C, B, v]
        return np.concatenate(list(shards), axis=-1)[:, : self.config.vocab_size]

    def _device_active(self) -> jax.Array:
        """The slot mask on the cores, placed again only when a slot changes (not every step)."""
        if self._active_placed is None or not np.array_equal(self._active_placed[0], self.active):
            self._active_placed = (self.active.copy(), self._replicate(self.active))
        return self._active_placed[1]

    def _check_compiled_for(self, sampling: Sampling) -> None:
        if self.opts.greedy and not sampling.greedy:
            raise WaferError("this decoder was compiled for greedy decoding; build it with "
                             "MeshOptions(greedy=False) to sample")

    def _knobs(self, sampling: Sampling) -> list:
        """The knobs of every slot choosing with `sampling`, on the cores."""
        if sampling not in self._knobs_placed:
            self._knobs_placed[sampling] = place_knobs(self.core_mesh, [sampling] * self.batch)
        return self._knobs_placed[sampling]

    def _slot_knobs(self) -> list:
        """Each slot's own knobs on the cores, placed again only when a slot's Sampling changes."""
        if self._slot_knobs_placed is None:
            self._slot_knobs_placed = place_knobs(self.core_mesh, self._sampling)
        return self._slot_knobs_placed

    def compile(self) -> float:
        """Compile the decode step once (shapes are fixed per batch); returns seconds spent now."""
        if self._compiled_step is not None:
            return 0.0
        t0 = time.perf_counter()
        r = self._replicate
        self._compiled_step = self._step.lower(self.tiles, self.k_cache, self.v_cache, r(self.tokens), r(self.pos),
                                               self._device_active(), *self._knobs(Sampling())).compile()
        return time.perf_counter() - t0


@dataclasses.dataclass
class _Landing:
    """A reserved slot being filled: what it will decode from once committed."""

    length: int
    next_token: int
    sampling: Sampling
    placed: set[int]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert_layer(k_cache, v_cache, k_new, v_new, slot):
    """Write one layer of one sequence's per-core slices [R, C, k, s, H] into batch slot `slot`."""
    return (jax.lax.dynamic_update_index_in_dim(k_cache, k_new, slot, axis=2),
            jax.lax.dynamic_update_index_in_dim(v_cache, v_new, slot, axis=2))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert_slot(k_cache, v_cache, k_new, v_new, slot):
    """Write one sequence's per-core cache slices [R, C, k, s, H] into batch slot `slot`."""
    put = lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, slot, axis=2)
    return tuple(map(put, k_cache, k_new)), tuple(map(put, v_cache, v_new))
