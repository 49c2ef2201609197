"""Cost sources for the fleet simulator: how long a prefill batch, a decode step and a KV handoff take.

A cost source answers three questions (the `CostSource` protocol):

- `prefill_s(prompt_lens)`: one prefill batch of these prompts, start to results;
- `decode_step_s(batch, context_tokens)`: one decode step over `batch` sequences whose KV
  caches hold `context_tokens` positions in all (the sum over the batch: every model here reads
  attention state in proportion to it, and passing the sum keeps a step O(1) to price);
- `handoff_s(tokens)`: shipping the KV cache of a prompt of `tokens` tokens into its slot.

Each is a small model with its assumptions in the open:

- `MeasuredCost`: linear fits of times measured on this machine's real workers, read from a JSON
  file (format in its docstring); `fit_measured` makes one from samples.
- `WaferDecodeCost`: the project's profiler (`model.trace_decode.profile_layout`) at two batch
  sizes, linear in between; wafers per replica come from its staging plan. Profiles are kept on
  disk, keyed by their arguments and the profiler's code (serve/profile_cache.py).
- `DensePrefillCost`: FLOPs counted from the model config over `peak FLOP/s x MFU` of a group of
  accelerators (an `Accelerator` preset from vendor specs), never faster than one read of the
  weights from HBM.
- `KVLinkCost`: latency + bytes / bandwidth, for a `Link` preset (EFA generations); bytes are those
  of the project's KV wire format (kvcache/format.py).
- `IntegratedCost`: the same accelerators doing both phases; decode priced by the roofline (the
  slower of the step's FLOPs at peak x MFU and its HBM traffic, weights plus KV, at
  bandwidth x efficiency), with and without chunked prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Protocol, Sequence

import numpy as np

from mesh.errors import WaferError
from mesh.extent import round_up
from mesh.wafer import WaferSpec
from model.config import ModelConfig


class CostSource(Protocol):
    def prefill_s(self, prompt_lens: Sequence[int]) -> float: ...

    def decode_step_s(self, batch: int, context_tokens: int) -> float: ...

    # Optional, for the simulator's steps in bulk: decode_step_s at each of `contexts` (an int64
    # array), elementwise with the same float operations, so the results are the same bits.
    # def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray: ...

    def handoff_s(self, tokens: int) -> float: ...

    # Optional: `handoff_on_prefill = True` when a unit's handoffs run on its prefill worker (the
    # one CPU that also runs its prefills), so a handoff and a prefill batch never overlap.
    # Optional: `slowdowns = (prefill, decode)` when the two workers slow each other down while
    # both work (they share one machine: MeasuredCost.contention).
    # Optional: `listens_between_steps = True` when the decode worker opens a handoff's listener
    # only between two decode steps (the live server), so a transfer waits for the step in flight.


# Model arithmetic, counted from the config.

def weight_params(c: ModelConfig) -> int:
    """Parameters of the matmuls a token passes (layers and LM head; the embedding is a lookup)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim
    return c.n_layers * per_layer + c.dim * c.vocab_size


def weight_bytes(c: ModelConfig, itemsize: int = 2) -> int:
    """Weights held in memory (embedding included unless tied)."""
    embed = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return (weight_params(c) + embed) * itemsize


def prefill_flops(c: ModelConfig, prompt_lens: Sequence[int]) -> float:
    """FLOPs of a prefill: 2 per parameter per prompt token in the layers, the LM head once per
    prompt (only the last position's logits are needed), and causal attention: QK^T and PV, each
    2 x N x H multiply-adds per (query, key) pair, T(T+1)/2 pairs per layer for a prompt of T."""
    layer_params = weight_params(c) - c.dim * c.vocab_size
    tokens = sum(prompt_lens)
    pairs = sum(t * (t + 1) / 2 for t in prompt_lens)
    return (2.0 * layer_params * tokens + 2.0 * c.dim * c.vocab_size * len(prompt_lens)
            + 4.0 * c.n_layers * c.n_heads * c.head_dim * pairs)


def decode_flops(c: ModelConfig, batch: int, context_tokens: int) -> float:
    """FLOPs of one decode step: every parameter twice per sequence, attention over its context."""
    return 2.0 * weight_params(c) * batch + 4.0 * c.n_layers * c.n_heads * c.head_dim * context_tokens


def kv_wire_bytes(c: ModelConfig, tokens: int, itemsize: int = 2) -> int:
    """Bytes of the KV wire format (kvcache/FORMAT.md) for a prompt of `tokens`: per layer a frame
    prefix, K and V, a checksum; the header is bounded by MAX_HEADER_BYTES and counted at that
    bound (it is a few hundred bytes in practice, a rounding error at any real prompt length)."""
    from kvcache.format import CHECKSUM, FRAME_PREFIX, MAX_HEADER_BYTES

    per_layer = FRAME_PREFIX.size + 2 * c.n_kv_heads * c.head_dim * tokens * itemsize + CHECKSUM.size
    return MAX_HEADER_BYTES + c.n_layers * per_layer


# Hardware presets.

@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A dense accelerator from its vendor's spec sheet (16-bit dense, no sparsity)."""

    name: str
    peak_flops: float  # dense BF16/FP16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float
    watts: float | None = None  # board power, where the vendor states it
    source: str = ""
    # Power of the system the accelerator is sold in, per accelerator (host CPUs, NICs, fans and
    # power supplies included): the figure to set against a CS-3's system power at equal footprint.
    system_watts: float | None = None
    system_source: str = ""


GB, TB = 1e9, 1e12
GIB = 1 << 30
H100 = Accelerator("h100", 989e12, 3.35 * TB, 80 * GB, 700.0, "NVIDIA H100 SXM5 datasheet",
                   10.2e3 / 8, "NVIDIA DGX H100 datasheet: ~10.2 kW max system power for 8 GPUs")
B200 = Accelerator("b200", 2.25e15, 8.0 * TB, 180 * GB, 1000.0, "NVIDIA HGX B200 datasheet (per GPU)",
                   14.3e3 / 8, "NVIDIA DGX B200 datasheet: ~14.3 kW max system power for 8 GPUs")
# Trainium2/3: AWS publishes no chip, server or UltraServer power, so no footprint in kW is offered.
TRAINIUM2 = Accelerator("trainium2", 667e12, 2.9 * TB, 96 * GIB, None, "AWS Neuron docs, Trainium2 architecture")
TRAINIUM3 = Accelerator("trainium3", 671e12, 4.9 * TB, 144 * GIB, None, "AWS Neuron docs, Trainium3 architecture")
ACCELERATORS = {a.name: a for a in (H100, B200, TRAINIUM2, TRAINIUM3)}


@dataclasses.dataclass(frozen=True)
class Link:
    """A network link between a prefill group and a decode replica: per-instance bandwidth and a
    one-way latency per transfer. The bandwidths are AWS's per-instance EFA figures for the named
    instances (one link per unit carries its caches one at a time); the latencies are assumptions
    (EFA's small-message latency is of order 10-20 us), dwarfed by any real cache's bytes."""

    name: str
    bytes_per_s: float
    latency_s: float
    source: str = ""


GBIT = 1e9 / 8
EFA_V1 = Link("efa1", 400 * GBIT, 20e-6, "EFA (first generation), p4d.24xlarge: 4 x 100 Gb/s")
EFA_V2 = Link("efa2", 3200 * GBIT, 15e-6, "EFA v2, p5.48xlarge: 3,200 Gb/s")
EFA_V3 = Link("efa3", 3200 * GBIT, 10e-6, "EFA v3, p5en.48xlarge and trn2.48xlarge: 3,200 Gb/s")
EFA_V4 = Link("efa4", 3200 * GBIT, 10e-6, "EFA v4, p6-b200.48xlarge: 3,200 Gb/s")
LINKS = {l.name: l for l in (EFA_V1, EFA_V2, EFA_V3, EFA_V4)}


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name]
    except KeyError:
        raise WaferError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}") from None


def link(name: str) -> Link:
    try:
        return LINKS[name]
    except KeyError:
        raise WaferError(f"unknown link {name!r}; known: {', '.join(LINKS)}") from None


# The cost models.

@dataclasses.dataclass(frozen=True)
class DensePrefillCost:
    """Prefill on `count` accelerators (a fraction is a time share of one): the slower of the
    batch's FLOPs at `peak x mfu` and one read of the weights at HBM bandwidth, plus a fixed
    per-batch overhead (launch, scheduling; an assumption)."""

    config: ModelConfig
    chip: Accelerator
    count: float
    mfu: float = 0.5  # assumption: DistServe and Splitwise see roughly 40-60% on large prefills
    overhead_s: float = 2e-3

    @functools.cached_property
    def _weights_s(self) -> float:
        return weight_bytes(self.config) / (self.count * self.chip.hbm_bytes_per_s)

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        compute = prefill_flops(self.config, prompt_lens) / (self.count * self.chip.peak_flops * self.mfu)
        return self.overhead_s + max(compute, self._weights_s)


@dataclasses.dataclass(frozen=True)
class KVLinkCost:
    """One cache over `link`: its latency plus the wire format's bytes at its bandwidth."""

    config: ModelConfig
    link: Link
    itemsize: int = 2

    @functools.cached_property
    def _bytes(self) -> tuple[int, int]:
        """The wire format's fixed bytes and bytes per token (it is linear in the token count)."""
        fixed = kv_wire_bytes(self.config, 0, self.itemsize)
        return fixed, kv_wire_bytes(self.config, 1, self.itemsize) - fixed

    def handoff_s(self, tokens: int) -> float:
        fixed, per_token = self._bytes
        return self.link.latency_s + (fixed + per_token * tokens) / self.link.bytes_per_s


@dataclasses.dataclass(frozen=True)
class WaferDecodeCost:
    """Decode on one replica of wafers, from the profiler: the per-token step time at batch 1 and
    at `slots`, both at `context` positions per sequence (the slot's reserved length), and linear
    in the batch between them. The profile prices attention at the full reserved context, so the
    step time does not fall for shorter contexts: an upper bound, as the wafer reserves the SRAM
    either way."""

    step_1_s: float
    step_slots_s: float
    slots: int
    wafers: int  # per replica, from the staging plan
    grid: str
    context: int

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        if self.slots == 1:
            return self.step_1_s
        return self.step_1_s + (self.step_slots_s - self.step_1_s) * (batch - 1) / (self.slots - 1)

    def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray:
        return np.full(contexts.shape, self.decode_step_s(batch, 0))  # the same at every context


def _trace_profile(config: ModelConfig, grid: str, spec: WaferSpec, batch: int, context: int) -> tuple[float, int]:
    # Imported here: the profiler brings JAX, which a simulation on other cost sources never needs.
    from mesh.executors import Grid
    from model.trace_decode import profile_layout

    p = profile_layout(config, Grid.parse(grid), spec, batch=batch, context=context)
    return p.token_s, p.staging.wafers


@functools.lru_cache(maxsize=64)
def _profile(config: ModelConfig, grid: str, spec: WaferSpec, batch: int, context: int) -> tuple[float, int]:
    """Seconds per token and wafers per replica; from the disk when this code profiled it before
    (serve/profile_cache.py), else traced."""
    from serve.profile_cache import cached_profile

    return cached_profile((config, grid, spec, batch, context),
                          lambda: _trace_profile(config, grid, spec, batch, context), WaferError)


def wafer_fits(config: ModelConfig, spec: WaferSpec, grid: str, batch: int, context: int) -> bool:
    try:
        _profile(config, grid, spec, batch, context)
    except WaferError:
        return False
    return True


def wafer_decode(config: ModelConfig, spec: WaferSpec, grid: str, context: int,
                 slots: int | None = None) -> WaferDecodeCost:
    """Profile decode on `spec` wafers with stages of `grid` cores (profiles are cached in-process
    and on disk).

    `slots` None: the largest power of two (up to 256) whose KV cache at `context` fits the SRAM.
    """
    if slots is None:
        if not wafer_fits(config, spec, grid, 1, context):
            _profile(config, grid, spec, 1, context)  # raises with the planner's explanation
        slots = 1
        while slots < 256 and wafer_fits(config, spec, grid, slots * 2, context):
            slots *= 2
    t1, wafers = _profile(config, grid, spec, 1, context)
    ts, wafers_s = _profile(config, grid, spec, slots, context) if slots > 1 else (t1, wafers)
    return WaferDecodeCost(t1, ts, slots, max(wafers, wafers_s), grid, context)


@dataclasses.dataclass(frozen=True)
class RooflineDecodeCost:
    """Decode on `count` accelerators by the roofline: the slower of the step's FLOPs at
    `peak x mfu` and its HBM traffic (every weight once, every cached K and V once) at
    `bandwidth x bw_efficiency`, plus a fixed per-step overhead (an assumption)."""

    config: ModelConfig
    chip: Accelerator
    count: float
    mfu: float = 0.5
    bw_efficiency: float = 0.8  # assumption: well-tuned decode kernels reach ~70-85% of HBM peak
    overhead_s: float = 1e-3

    @functools.cached_property
    def _per(self) -> tuple[float, float, float, float]:
        """Seconds per sequence and per context position of compute, and of the weights and per
        context position of HBM traffic (a step is priced in O(1))."""
        c, flops, bw = self.config, self.count * self.chip.peak_flops * self.mfu, \
            self.count * self.chip.hbm_bytes_per_s * self.bw_efficiency
        return (decode_flops(c, 1, 0) / flops, decode_flops(c, 0, 1) / flops, weight_bytes(c) / bw,
                c.kv_bytes_per_token(2) / bw)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        seq_s, ctx_flop_s, weights_s, ctx_byte_s = self._per
        compute = seq_s * batch + ctx_flop_s * context_tokens
        memory = weights_s + ctx_byte_s * context_tokens
        return self.overhead_s + max(compute, memory)

    def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray:
        seq_s, ctx_flop_s, weights_s, ctx_byte_s = self._per
        return self.overhead_s + np.maximum(seq_s * batch + ctx_flop_s * contexts, weights_s + ctx_byte_s * contexts)


def integrated_slots(config: ModelConfig, chip: Accelerator, count: int, context: int, most: int = 256,
                     usable: float = 0.9) -> int:
    """Sequences of `context` positions whose KV fits beside the weights in `usable` of the memory."""
    room = usable * count * chip.memory_bytes - weight_bytes(config)
    return max(0, min(most, int(room // (config.kv_bytes_per_token(2) * context))))


def group_size(config: ModelConfig, chip: Accelerator, context: int, min_slots: int = 8) -> int:
    """The smallest power-of-two group of `chip`s that holds the weights and `min_slots` caches."""
    n = 1
    while integrated_slots(config, chip, n, context) < min_slots:
        n *= 2
        if n > 1024:
            raise WaferError(f"{config.name} does not fit any group of {chip.name}s up to 1024")
    return n


@dataclasses.dataclass(frozen=True)
class IntegratedCost:
    """One integrated replica: `count` accelerators doing prefill and decode, no handoff.

    With `chunked`, prefill is priced as Sarathi-style chunks piggybacked on decode steps: the
    chunk's FLOPs only, as the weight read and the per-batch overhead are shared with the decode
    step it rides on. The scheduler still runs a prefill between two decode steps (it has no mixed
    step), so this prices chunking's throughput gain, not the smoother inter-token gaps it brings.
    """

    prefill: DensePrefillCost
    decode: RooflineDecodeCost
    chunked: bool = False

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        if self.chunked:
            p = self.prefill
            return prefill_flops(p.config, prompt_lens) / (p.count * p.chip.peak_flops * p.mfu)
        return self.prefill.prefill_s(prompt_lens)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode.decode_step_s(batch, context_tokens)

    def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray:
        return self.decode.decode_steps_s(batch, contexts)

    def handoff_s(self, tokens: int) -> float:
        return 0.0


@dataclasses.dataclass(frozen=True)
class DisaggregatedCost:
    """A prefill share, a decode replica and the link between them, as one cost source."""

    prefill: DensePrefillCost | MeasuredCost
    decode: WaferDecodeCost | RooflineDecodeCost | MeasuredCost
    link: KVLinkCost | MeasuredCost

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        return self.prefill.prefill_s(prompt_lens)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode.decode_step_s(batch, context_tokens)

    def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray:
        return self.decode.decode_steps_s(batch, contexts)

    def handoff_s(self, tokens: int) -> float:
        return self.link.handoff_s(tokens)


@dataclasses.dataclass(frozen=True)
class MeasuredCost:
    """Linear fits of times measured on real workers. The file is JSON:

        {"prefill": {"fixed_s": a, "per_token_s": b, "per_token2_s": c},
         "decode":  {"fixed_s": a, "per_seq_s": b, "per_context_token_s": c},
         "handoff": {"fixed_s": a, "per_token_s": b},
         "slots": 8, "note": "how, where and when it was measured", "handoff_on_prefill": true,
         "listens_between_steps": true}

    prefill_s = a + b * sum(T) + c * sum(T^2) over the batch's prompt lengths T;
    decode_step_s = a + b * batch + c * (context positions of the batch);
    handoff_s = a + b * prompt tokens. Missing coefficients are 0.

    `handoff_on_prefill` (default false): the measured server ships each cache from its prefill
    worker, on the CPU its prefills run on (`wafer serve` disaggregated: a thread of the prefill
    worker process, pinned with it), so the simulator starts a unit's handoff no earlier than the
    end of the prefill batch in flight (the worker reads the ship command after it); a prefill
    batch does not wait for the handoffs (serve/simulator.py).

    `listens_between_steps` (default false): the measured server's decode worker takes commands
    only between decode steps, so the listener a handoff streams into opens at the end of the step
    in flight when the cache was placed (and the landed cache joins at the boundary after the
    transfer, as on any decode worker): the simulator starts such a transfer no earlier than that,
    and a step waits for a cache that is landing when the step is decided (the worker places
    arriving caches in its loop before it steps).

    `contention` (default none): `{"prefill": p, "decode": d}`, how many times slower each worker
    runs while the other one works. Two workers pinned to different CPUs of one machine still
    share its cores, caches and memory bandwidth, and with other work on the machine they share
    what it leaves them (on this 2-vCPU machine, while another session's tests ran, a prefill ran
    3x slower while the decode worker stepped; quiet, not measurably), so the simulator runs a
    prefill batch `p` times slower while the decode batch steps (until it would empty), and slows
    decode steps by `d` while a prefill batch runs (serve/simulator.py). Measured by `wafer bench serve-costs`.
    """

    prefill: dict
    decode: dict
    handoff: dict
    slots: int | None = None
    note: str = ""
    handoff_on_prefill: bool = False
    contention: dict = dataclasses.field(default_factory=dict)
    listens_between_steps: bool = False

    def __post_init__(self):
        for worker, factor in self.contention.items():
            if worker not in ("prefill", "decode") or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"contention {self.contention}: expected positive factors for prefill and decode")

    @property
    def slowdowns(self) -> tuple[float, float]:
        """(prefill, decode): each worker's time factor while the other one works."""
        return float(self.contention.get("prefill", 1.0)), float(self.contention.get("decode", 1.0))

    def scaled(self, prefill: float = 1.0, decode: float = 1.0) -> "MeasuredCost":
        """The same cost with every prefill time `prefill` times and every decode step `decode`
        times as long: the fits' shape, another level (a machine that ran faster or slower)."""
        def times(fit: dict, k: float) -> dict:
            return {name: value * k for name, value in fit.items()}
        return dataclasses.replace(self, prefill=times(self.prefill, prefill), decode=times(self.decode, decode))

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        p = self.prefill
        return (p.get("fixed_s", 0.0) + p.get("per_token_s", 0.0) * sum(prompt_lens)
                + p.get("per_token2_s", 0.0) * sum(t * t for t in prompt_lens))

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        d = self.decode
        return d.get("fixed_s", 0.0) + d.get("per_seq_s", 0.0) * batch + d.get("per_context_token_s", 0.0) * context_tokens

    def decode_steps_s(self, batch: int, contexts: np.ndarray) -> np.ndarray:
        return self.decode_step_s(batch, contexts)  # the same expression works elementwise

    def handoff_s(self, tokens: int) -> float:
        h = self.handoff
        return h.get("fixed_s", 0.0) + h.get("per_token_s", 0.0) * tokens

    def to_json(self) -> dict:
        return {"prefill": self.prefill, "decode": self.decode, "handoff": self.handoff, "slots": self.slots,
                "note": self.note, "handoff_on_prefill": self.handoff_on_prefill, "contention": self.contention,
                "listens_between_steps": self.listens_between_steps}


def load_measured(path: str | pathlib.Path) -> MeasuredCost:
    """A measured cost file: a `PaddedMeasuredCost` when it names the workers' padding (as the
    files of `wafer bench serve-costs` do), else a plain `MeasuredCost`."""
    try:
        d = json.loads(pathlib.Path(path).read_text())
        flags = {}
        for name in ("handoff_on_prefill", "listens_between_steps"):
            flags[name] = d.get(name, False)
            if not isinstance(flags[name], bool):
                raise ValueError(f"{name} {flags[name]!r}: expected true or false")
        m = MeasuredCost(dict(d["prefill"]), dict(d["decode"]), dict(d["handoff"]), d.get("slots"),
                         d.get("note", ""), contention=dict(d.get("contention") or {}), **flags)
        padding = d.get("padding")
        if padding is None:
            return m
        if padding.get("batch") != "pow2" or int(padding["bucket"]) < 1:
            raise ValueError(f"padding {padding}: expected batch 'pow2' and a positive bucket")
        return PaddedMeasuredCost(**dataclasses.asdict(m), bucket=int(padding["bucket"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WaferError(f"measured cost file {path}: {e}") from None


def _lstsq(columns: list[np.ndarray], y: np.ndarray) -> list[float]:
    a = np.stack(columns, axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return [float(c) for c in coef]


def fit_measured(prefill: Sequence[tuple[Sequence[int], float]], decode: Sequence[tuple[int, int, float]],
                 handoff: Sequence[tuple[int, float]], slots: int | None = None, note: str = "",
                 solve=_lstsq) -> MeasuredCost:
    """Least-squares fits of the `MeasuredCost` forms to samples: prefill (prompt lengths, seconds),
    decode (batch, context positions, seconds), handoff (prompt tokens, seconds). `solve(columns, y)`
    fits one form (default: plain least squares; `nonneg_relative_fit`: non-negative, relative)."""
    lens = [np.asarray(l, np.float64) for l, _ in prefill]
    p = solve([np.ones(len(lens)), np.array([l.sum() for l in lens]), np.array([(l * l).sum() for l in lens])],
              np.array([s for _, s in prefill]))
    d_arr = np.asarray(decode, np.float64).reshape(-1, 3)
    d = solve([np.ones(len(d_arr)), d_arr[:, 0], d_arr[:, 1]], d_arr[:, 2])
    h_arr = np.asarray(handoff, np.float64).reshape(-1, 2)
    h = solve([np.ones(len(h_arr)), h_arr[:, 0]], h_arr[:, 1])
    return MeasuredCost({"fixed_s": p[0], "per_token_s": p[1], "per_token2_s": p[2]},
                        {"fixed_s": d[0], "per_seq_s": d[1], "per_context_token_s": d[2]},
                        {"fixed_s": h[0], "per_token_s": h[1]}, slots, note)


@dataclasses.dataclass(frozen=True)
class PaddedMeasuredCost(MeasuredCost):
    """A `MeasuredCost` whose prefill is priced over the shapes the serving workers compute: they
    pad a batch to a power of two of prompts, each as long as the batch's longest rounded up to
    `bucket` tokens (serve/workers.py, model/prefill.py), so a batch of a 32- and a 200-token
    prompt costs what two 224-token prompts cost. `wafer bench serve-costs` fits its samples in
    these terms and writes `"padding": {"batch": "pow2", "bucket": N}` into the file."""

    bucket: int = 32

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        n = len(prompt_lens)
        longest = round_up(max(prompt_lens), self.bucket)
        return super().prefill_s([longest] * (1 << (n - 1).bit_length()))

    def to_json(self) -> dict:
        return dict(super().to_json(), padding={"batch": "pow2", "bucket": self.bucket})


def measured_policy(path: str | pathlib.Path) -> dict | None:
    """The scheduler policy (mode, slots, queue and batch bounds, deadlines) a measured cost file
    records for the server it was measured on (`wafer bench serve-costs` writes it), or None."""
    try:
        sched = json.loads(pathlib.Path(path).read_text()).get("scheduler")
        return None if sched is None else dict(sched)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise WaferError(f"measured cost file {path}: {e}") from None


def nonneg_relative_fit(columns: list[np.ndarray], y: np.ndarray) -> list[float]:
    """Non-negative coefficients minimising the relative error (each sample weighted by 1/y; a
    zero sample by 1). Samples spanning 50x (a 64-token prefill and four of 448) make plain least
    squares fit the largest and give the smallest a negative time; a cost never runs backwards."""
    from scipy.optimize import nnls  # scipy comes with JAX

    a = np.stack(columns, axis=1)
    w = np.where(y > 0, 1.0 / np.where(y > 0, y, 1.0), 1.0)
    coef, _ = nnls(a * w[:, None], y * w)
    return [float(c) for c in coef]
