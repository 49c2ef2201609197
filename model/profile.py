"""The layout profiler's model side: which per-core program, which operands, what a layout costs.

`profile_layout` traces the wafer decode step (`core_decode_step`, the program the devices and
vcores executors run) with the trace executor on abstract operands built from the layout's
`TensorSpec`s, prices it with the wafer cost model, and decides how the layers are staged:

- every layer has the same shapes, so the program is traced with one and with two layers; their
  difference is one layer's bytes, FLOPs and messages exactly, and a model of L layers costs
  the one-layer trace plus L - 1 more layers (tests check this against a full trace);
- a stage is one grid holding as many layers as fit its cores' SRAM beside the embedding, the
  LM head and the step's buffers; stages are placed side by side on a wafer and, when a wafer
  is full, on more wafers. A token passes every stage in turn, so stages add time, not speed.

The grid autotuner picks the fastest grid whose stages fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.allreduce import Schedule
from mesh.axes import COL, ROW
from mesh.cost_model import (
    KernelTime,
    kernel_times,
    price_calls,
    sent_bytes_per_position,
)
from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.planner import Kind, SramPlan, TensorSpec, plan_sram
from mesh.trace import CoreTrace, trace_program
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from model.wafer_decode import MeshOptions, core_decode_step
from model.wafer_layout import WaferLayout

KERNELS = ("embed", "attention", "mlp", "lm_head", "sample")


def kernel_of(scope: str) -> str:
    """The kernel a named scope belongs to (the decode step's scopes; rope tables etc.: other)."""
    for frame in scope.split("/"):
        if frame in KERNELS:
            return frame
    return "other"


def layout_specs(layout: WaferLayout, batch: int, dtype: str) -> list[TensorSpec]:
    """The layout's tensors with weights and KV cache stored as `dtype` (buffers stay float32)."""
    return [dataclasses.replace(s, dtype=dtype) if s.kind in (Kind.WEIGHT, Kind.KV) else s
            for s in layout.tensor_specs(batch)]


def abstract_operands(layout: WaferLayout, batch: int, dtype: str = "float32") -> tuple:
    """One core's operands of `core_decode_step` as `jax.ShapeDtypeStruct`s, from the TensorSpecs."""
    L = layout.config.n_layers
    tiles: dict = {"layers": [{} for _ in range(L)]}
    k_cache, v_cache = [None] * L, [None] * L
    for s in layout_specs(layout, batch, dtype):
        aval = jax.ShapeDtypeStruct(s.local_shape, s.dtype)
        if s.kind is Kind.WEIGHT:
            parts = s.name.split(".")
            if parts[0] == "layers":
                tiles["layers"][int(parts[1])][parts[2]] = aval
            else:
                tiles[s.name] = aval
        elif s.kind is Kind.KV:
            _, i, which = s.name.split(".")
            (k_cache if which == "k_cache" else v_cache)[int(i)] = aval
    B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    scalar = functools.partial(jax.ShapeDtypeStruct, ())
    return (tiles, tuple(k_cache), tuple(v_cache), B, B, jax.ShapeDtypeStruct((batch,), jnp.bool_),
            scalar(jnp.uint32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))


def _operand_kind(path: str) -> str:
    """Operands 0 (tiles), 1 and 2 (caches) of `core_decode_step`; the rest are step inputs."""
    if path.startswith("[0]"):
        return Kind.WEIGHT.value
    if path.startswith(("[1]", "[2]")):
        return Kind.KV.value
    return "input"


def trace_decode_step(layout: WaferLayout, batch: int, opts: MeshOptions, dtype: str = "float32") -> CoreTrace:
    """The decode step of one core, traced at the layout's real tile sizes (nothing allocated)."""
    program = functools.partial(core_decode_step, layout=layout, opts=opts)
    return trace_program(program, layout.grid, abstract_operands(layout, batch, dtype), _operand_kind)


@dataclasses.dataclass(frozen=True)
class Staging:
    """How a model's layers are cut into stages of one grid each, and how many wafers hold them.

    Every stage holds the step's buffers; the first also the embedding table (the LM tile when
    the embedding is tied), the last the final norm and LM head. When those do not fit beside a
    layer they take a stage of their own.
    """

    layers_per_stage: int  # in a middle stage
    stages: int
    stages_per_wafer: int
    wafers: int
    handoff_s: float  # per token: moving the activations from stage to stage (and back)


def _stage_groups(specs: list[TensorSpec], tied: bool) -> dict[str, int]:
    """Bytes per core of each placement group: one layer, embedding, head, buffers."""
    out = {"layer": 0, "embed": 0, "head": 0, "buffer": 0}
    for s in specs:
        if s.kind is Kind.BUFFER:
            out["buffer"] += s.local_bytes
        elif s.name.startswith("layers.0."):
            out["layer"] += s.local_bytes
        elif s.name in ("final_norm", "lm"):
            out["head"] += s.local_bytes
            if s.name == "lm" and tied:
                out["embed"] += s.local_bytes
        elif s.name == "embed":
            out["embed"] += s.local_bytes
    return out


def _staging(config: ModelConfig, grid: Grid, spec: WaferSpec, groups: dict[str, int], x_bytes: int) -> Staging:
    budget, layer, L = spec.sram_per_core, groups["layer"], config.n_layers
    room = budget - groups["buffer"]
    per_stage = min(L, room // layer) if room > 0 else 0
    if per_stage < 1 or groups["embed"] > room or groups["head"] > room:
        need = max(layer, groups["embed"], groups["head"])
        raise WaferError(
            f"{config.name} does not fit {spec.name} on a {grid} grid: a stage needs {need + groups['buffer']:,} B "
            f"per core (one layer {layer:,} B, embedding {groups['embed']:,} B, head {groups['head']:,} B, "
            f"buffers {groups['buffer']:,} B) of {budget:,} B (short by {need + groups['buffer'] - budget:,} B)")
    # The first and last stages fill with layers after the embedding and the head.
    first = min(L, (room - groups["embed"]) // layer)
    last = min(L - first, (room - groups["head"]) // layer) if L > first else 0
    rest = L - first - last
    if rest == 0 and first + last == L and first == L and groups["embed"] + groups["head"] + L * layer <= room:
        stages = 1
    else:
        stages = 2 + math.ceil(rest / per_stage)
    per_wafer = (spec.max_rows // grid.rows) * (spec.max_cols // grid.cols)
    wafers = math.ceil(stages / per_wafer)
    # A hand-off streams each row's slice of x to the next grid: stage start-up, about one grid
    # side of hops, the slice's words over that row's link; between wafers, the inter-wafer link.
    # The last stage sends the chosen token back to the first.
    on_wafer = (spec.stage_cycles + max(grid.rows, grid.cols) * spec.hop_cycles
                + x_bytes / spec.link_bytes_per_cycle) / spec.clock_hz
    handoffs = stages if stages > 1 else 0
    crossings = wafers if wafers > 1 else 0
    return Staging(per_stage, stages, per_wafer, wafers, handoffs * on_wafer + crossings * spec.wafer_hop_s)


@dataclasses.dataclass(frozen=True)
class LayoutProfile:
    config: ModelConfig
    spec: WaferSpec
    grid: Grid  # one stage's grid
    schedule: Schedule
    groups: int | None
    batch: int
    context: int
    dtype: str
    plan: SramPlan  # one stage's per-core plan (the largest: the first stage, with the embedding)
    layer_bytes: int  # per core, one layer (weights + KV)
    staging: Staging
    per_layer: dict[str, KernelTime]
    per_token: dict[str, KernelTime]  # every layer, embedding, head, sampling; one token
    collectives_per_layer: list  # priced calls of one layer (mesh.cost_model.CallCost)
    trace_eqns: int

    @property
    def token_s(self) -> float:
        return sum(k.time_s for k in self.per_token.values()) + self.staging.handoff_s

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second per request: each step gives every sequence of the batch one token."""
        return 1.0 / self.token_s

    @property
    def layer_s(self) -> float:
        return sum(k.time_s for k in self.per_layer.values())

    def shares(self) -> dict[str, float]:
        """Share of the token's time bound by compute, by SRAM reads and by the fabric."""
        compute = sum(k.compute_s for k in self.per_token.values() if k.compute_s >= k.memory_s)
        memory = sum(k.memory_s for k in self.per_token.values() if k.memory_s > k.compute_s)
        fabric = sum(k.fabric_s for k in self.per_token.values()) + self.staging.handoff_s
        total = compute + memory + fabric
        return {"compute": compute / total, "memory": memory / total, "fabric": fabric / total}


def _combine(a: KernelTime, b: KernelTime, wa: float, wb: float) -> KernelTime:
    f = lambda x, y: wa * x + wb * y
    return KernelTime(a.name, round(f(a.flops, b.flops)), round(f(a.read_bytes, b.read_bytes)),
                      round(f(a.fabric_bytes, b.fabric_bytes)), round(f(a.calls, b.calls)),
                      f(a.compute_s, b.compute_s), f(a.memory_s, b.memory_s), f(a.fabric_s, b.fabric_s))


def _zero(name: str) -> KernelTime:
    return KernelTime(name, 0, 0, 0, 0, 0.0, 0.0, 0.0)


def _layers(config: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(config, n_layers=n)


def profile_layout(config: ModelConfig, grid: Grid, spec: WaferSpec, schedule: Schedule = Schedule.KTREE,
                   groups: int | None = None, batch: int = 1, context: int = 4096,
                   dtype: str = "bfloat16") -> LayoutProfile:
    """Trace, plan and price decode of `config` with stages of `grid` cores on `spec` wafers."""
    if grid.rows > spec.max_rows or grid.cols > spec.max_cols:
        raise WaferError(f"grid {grid} exceeds {spec.name}'s {spec.max_rows}x{spec.max_cols} cores")
    if context > config.max_seq_len:
        raise WaferError(f"context {context} exceeds {config.name}'s {config.max_seq_len} positions")
    opts = MeshOptions(schedule, groups, greedy=True)
    one, two = (WaferLayout(_layers(config, n), grid, context) for n in (1, 2))
    groups_bytes = _stage_groups(layout_specs(one, batch, dtype), config.tie_embeddings)
    staging = _staging(config, grid, spec, groups_bytes, batch * one.d * 4)
    # The plan of a middle stage: its layers and the buffers (the first and last stages hold
    # fewer layers beside the embedding or the head, within the same budget).
    stage_layout = WaferLayout(_layers(config, staging.layers_per_stage), grid, context)
    middle = [s for s in layout_specs(stage_layout, batch, dtype) if s.name.startswith("layers.")
              or s.kind is Kind.BUFFER]
    plan = plan_sram(middle, grid.rows, grid.cols, spec)
    layer_bytes = groups_bytes["layer"]

    t1, t2 = (trace_decode_step(lay, batch, opts, dtype) for lay in (one, two))
    k1, k2 = (kernel_times(t, spec, kernel_of) for t in (t1, t2))
    names = sorted(set(k1) | set(k2))
    per_layer = {g: _combine(k2.get(g, _zero(g)), k1.get(g, _zero(g)), 1, -1) for g in names}
    per_layer = {g: k for g, k in per_layer.items() if k.time_s > 0 or k.flops > 0}
    L = config.n_layers
    per_token = {g: _combine(k1.get(g, _zero(g)), per_layer.get(g, _zero(g)), 1, L - 1) for g in names}
    layer_calls = price_calls([c for c in t2.collectives if c.scope.startswith("layer1/")], spec)
    return LayoutProfile(config, spec, grid, schedule, groups, batch, context, dtype, plan, layer_bytes, staging,
                         per_layer, per_token, layer_calls, t1.jaxpr_eqns + t2.jaxpr_eqns)


def sram_map(profile: LayoutProfile) -> tuple[np.ndarray, np.ndarray]:
    """Per-core bytes of a middle stage: (allocated [R, C], useful [R, C]: the part not padding).

    Every core allocates the same extents; padding (D over rows, KV and query heads, F and V over
    columns, cache positions over rows) leaves some cores holding zeros. Useful bytes follow the
    layout's rules in model/wafer_layout.py; a replicated KV head counts as useful on each of its
    columns (each needs its copy).
    """
    cfg, g = profile.config, profile.grid
    layout = WaferLayout(_layers(cfg, profile.staging.layers_per_stage), g, profile.context)
    item = np.dtype(profile.dtype).itemsize
    r, c = np.arange(g.rows)[:, None], np.arange(g.cols)[None, :]
    real = lambda total, per, idx: np.clip(total - idx * per, 0, per)
    d = real(cfg.dim, layout.d, r)
    heads = [layout.column_heads(i) for i in range(g.cols)]
    k = np.array([sum(h is not None for h in kv) for kv, _ in heads])[None, :]
    q = np.array([sum(h is not None for h in qs) for _, qs in heads])[None, :]
    f = real(cfg.ffn_dim, layout.f, c)
    s = np.array([sum(1 for j in range(layout.s) if j * g.rows + i < profile.context) for i in range(g.rows)])[:, None]
    H, B = cfg.head_dim, profile.batch
    per_layer = (2 * d + d * (q + 2 * k) * H + q * H * d + d * 2 * f + f * d + 2 * B * k * s * H
                 + ((q + 2 * k) * H if cfg.qkv_bias else 0))
    useful = layout.config.n_layers * per_layer  # a middle stage: its layers (the plan's weights and KV)
    allocated = np.full((g.rows, g.cols), profile.plan.per_core_bytes, dtype=np.int64)
    buffers = profile.plan.bytes_by_kind()["buffer"]
    return allocated, useful * item + buffers


def fabric_map(profile: LayoutProfile) -> np.ndarray:
    """Bytes each core of one stage sends per token over its layers (and the head), [R, C]."""
    g = profile.grid
    layout = WaferLayout(_layers(profile.config, 1), g, profile.context)
    trace = trace_decode_step(layout, profile.batch, MeshOptions(profile.schedule, profile.groups), profile.dtype)
    out = np.zeros((g.rows, g.cols))
    for c in trace.collectives:
        weight = profile.staging.layers_per_stage if c.scope.startswith("layer0/") else 1
        for pos, nbytes in sent_bytes_per_position(c).items():
            if c.axis == ROW:
                out[pos, :] += weight * nbytes
            elif c.axis == COL:
                out[:, pos] += weight * nbytes
    return out


def autotune_grid(config: ModelConfig, spec: WaferSpec, schedule: Schedule, batch: int, context: int,
                  dtype: str, candidates: list[Grid] | None = None, groups: int | None = None) -> list[LayoutProfile]:
    """Profiles of every candidate grid that fits, fastest first (raises if none fits)."""
    if candidates is None:
        sides_r = sorted({s for s in (16, 32, 64, 96, 128, 180, 240, 360, 480, 600, spec.max_rows)
                          if s <= spec.max_rows})
        sides_c = sorted({s for s in (8, 16, 32, 64, 96, 128, 180, 240, 360, 480, 600, spec.max_cols)
                          if s <= spec.max_cols})
        candidates = [Grid(r, c) for r in sides_r for c in sides_c]
    found, last_error = [], None
    for grid in candidates:
        try:
            found.append(profile_layout(config, grid, spec, schedule, groups, batch, context, dtype))
        except WaferError as e:
            last_error = e
    if not found:
        raise WaferError(f"no candidate grid fits {config.name} on {spec.name}: {last_error}")
    return sorted(found, key=lambda p: p.token_s)
