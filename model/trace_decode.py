"""The layout profiler's model side: the decode program traced on abstract operands, and priced.

`profile_layout` traces the wafer decode step (`core_decode_step`, the program the devices and
vcores executors run) with the trace executor on abstract operands built from the layout's
`TensorSpec`s, prices it with the wafer cost model, and stages the layers over grids and wafers
(mesh/staging.py):

- every layer has the same shapes, so the program is traced with one and with two layers; their
  difference is one layer's bytes, FLOPs and messages exactly, and a model of L layers costs
  the one-layer trace plus L - 1 more layers (tests check this against a full trace);
- the staging reads the bytes per core of one layer, the embedding, the head and the buffers
  from the same specs;
- two accountings of a token (`Accounting`): FULL prices the whole step (every layer, the
  embedding, the LM head and sampling, and the hand-offs between stages and wafers); PER_LAYER
  prices what WaferLLM's decode benchmark measured: one layer's time x L, nothing else (no
  embedding, no LM head, no layer-to-layer or wafer-to-wafer hop).

Reports, maps and the grid autotuner built on these profiles live in bench/.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp

from kernels.allreduce import Schedule
from mesh.axes import KERNEL_SCOPES, layer_scope
from mesh.cost_model import KernelTime, kernel_times, price_calls
from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.planner import SramPlan, plan_sram
from mesh.staging import StageBytes, Staging, plan_staging
from mesh.tensor_spec import Kind, TensorSpec
from mesh.trace import CoreTrace, trace_program
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from model.wafer_decode import MeshOptions, core_decode_step
from model.wafer_layout import LAYERS, LM_HEAD_TILE, LayoutMode, WaferLayout, nest_by_name

INPUT = "input"  # the kind of the step's inputs (tokens, positions, sampling knobs)


def kernel_of(scope: str) -> str:
    """The kernel a named scope belongs to (the decode step's scopes; rope tables etc.: other)."""
    for frame in scope.split("/"):
        if frame in KERNEL_SCOPES:
            return frame
    return "other"


def layout_specs(layout: WaferLayout, batch: int, dtype: str) -> list[TensorSpec]:
    """The layout's tensors with weights, KV cache and activations stored as `dtype`
    (`WaferLayout.tensor_specs`: scores and logits stay float32)."""
    return layout.tensor_specs(batch, dtype)


@dataclasses.dataclass(frozen=True)
class StepOperands:
    """One core's operands of `core_decode_step`, abstract, with the kind of each."""

    args: tuple  # jax.ShapeDtypeStructs, in core_decode_step's order
    kinds: tuple  # the same pytree as args: the kind each operand's bytes count under


def abstract_operands(layout: WaferLayout, batch: int, dtype: str = "float32") -> StepOperands:
    """One core's operands of `core_decode_step` as `jax.ShapeDtypeStruct`s, from the TensorSpecs."""
    L = layout.config.n_layers
    weights, weight_kinds = {}, {}
    caches = {"k_cache": [None] * L, "v_cache": [None] * L}
    for s in layout_specs(layout, batch, dtype):
        aval = jax.ShapeDtypeStruct(s.local_shape, s.dtype)
        if s.kind is Kind.WEIGHT:
            weights[s.name], weight_kinds[s.name] = aval, s.kind.value
        elif s.kind is Kind.KV:
            _, i, which = s.name.split(".")
            caches[which][int(i)] = (aval, s.kind.value)
    k_cache, v_cache = (tuple(a for a, _ in caches[w]) for w in ("k_cache", "v_cache"))
    k_kinds, v_kinds = (tuple(k for _, k in caches[w]) for w in ("k_cache", "v_cache"))
    B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    per_slot = functools.partial(jax.ShapeDtypeStruct, (batch,))  # each slot's sampling knobs
    inputs = (B, B, per_slot(jnp.bool_), per_slot(jnp.uint32), per_slot(jnp.float32), per_slot(jnp.int32),
              per_slot(jnp.float32))
    return StepOperands((nest_by_name(weights, L), k_cache, v_cache) + inputs,
                        (nest_by_name(weight_kinds, L), k_kinds, v_kinds) + (INPUT,) * len(inputs))


def trace_decode_step(layout: WaferLayout, batch: int, opts: MeshOptions, dtype: str = "float32") -> CoreTrace:
    """The decode step of one core, traced at the layout's real tile sizes (nothing allocated)."""
    program = functools.partial(core_decode_step, layout=layout, opts=opts)
    operands = abstract_operands(layout, batch, dtype)
    return trace_program(program, layout.grid, operands.args, operands.kinds)


def stage_bytes(layout: WaferLayout, batch: int, dtype: str) -> StageBytes:
    """Bytes per core of each placement group of `layout`: its first layer, the embedding, the
    head, the buffers (a tied model's LM head tile counts as the embedding and as the head)."""
    out = {"layer": 0, "embed": 0, "head": 0, "buffer": 0}
    for s in layout_specs(layout, batch, dtype):
        if s.kind is Kind.BUFFER:
            out["buffer"] += s.local_bytes
        elif s.name.startswith(f"{LAYERS}.0."):
            out["layer"] += s.local_bytes
        elif s.name in ("final_norm", LM_HEAD_TILE):
            out["head"] += s.local_bytes
        if s.name == layout.embedding_tile:
            out["embed"] += s.local_bytes
    return StageBytes(**out)


class Accounting(enum.Enum):
    """What a token's time counts (module docstring)."""

    FULL = "full"
    PER_LAYER = "per-layer"


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
    per_token: dict[str, KernelTime]  # what one token costs under `accounting`
    collectives_per_layer: list  # priced calls of one layer (mesh.cost_model.CallCost)
    trace_eqns: int
    mode: LayoutMode = LayoutMode.AUTO  # the layout mode asked for (`layout` says what it chose)
    accounting: Accounting = Accounting.FULL

    @property
    def handoff_s(self) -> float:
        """Hand-offs between stages and wafers per token (none under PER_LAYER accounting)."""
        return self.staging.handoff_s if self.accounting is Accounting.FULL else 0.0

    @property
    def token_s(self) -> float:
        return sum(k.time_s for k in self.per_token.values()) + self.handoff_s

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
        fabric = sum(k.fabric_s for k in self.per_token.values()) + self.handoff_s
        total = compute + memory + fabric
        return {"compute": compute / total, "memory": memory / total, "fabric": fabric / total}

    def stage_layout(self) -> WaferLayout:
        """The layout of a middle stage: its layers on the profile's grid."""
        return WaferLayout(with_layers(self.config, self.staging.layers_per_stage), self.grid, self.context,
                           mode=self.mode)

    @property
    def useful_fraction(self) -> float:
        """Non-padding bytes / placed bytes of a middle stage (the plan's count)."""
        return self.plan.useful_fraction


def _combine(a: KernelTime, b: KernelTime, wa: float, wb: float) -> KernelTime:
    f = lambda x, y: wa * x + wb * y
    return KernelTime(a.name, round(f(a.flops, b.flops)), round(f(a.read_bytes, b.read_bytes)),
                      round(f(a.fabric_bytes, b.fabric_bytes)), round(f(a.calls, b.calls)),
                      f(a.compute_s, b.compute_s), f(a.memory_s, b.memory_s), f(a.fabric_s, b.fabric_s))


def _zero(name: str) -> KernelTime:
    return KernelTime(name, 0, 0, 0, 0, 0.0, 0.0, 0.0)


def with_layers(config: ModelConfig, n: int) -> ModelConfig:
    """`config` cut (or grown) to n layers: the model of one stage or of a one-layer trace."""
    return dataclasses.replace(config, n_layers=n)


def profile_layout(config: ModelConfig, grid: Grid, spec: WaferSpec, schedule: Schedule = Schedule.KTREE,
                   groups: int | None = None, batch: int = 1, context: int = 4096,
                   dtype: str = "bfloat16", mode: LayoutMode = LayoutMode.AUTO,
                   accounting: Accounting = Accounting.FULL) -> LayoutProfile:
    """Trace, plan and price decode of `config` with stages of `grid` cores on `spec` wafers,
    heads laid over the columns as `mode` says (model/wafer_layout.py); `accounting` says what a
    token's time counts (`Accounting`)."""
    if grid.rows > spec.max_rows or grid.cols > spec.max_cols:
        raise WaferError(f"grid {grid} exceeds {spec.name}'s {spec.max_rows}x{spec.max_cols} cores")
    if context > config.max_seq_len:
        raise WaferError(f"context {context} exceeds {config.name}'s {config.max_seq_len} positions")
    opts = MeshOptions(schedule, groups, greedy=True)
    one, two = (WaferLayout(with_layers(config, n), grid, context, mode=mode) for n in (1, 2))
    groups_bytes = stage_bytes(one, batch, dtype)
    staging = plan_staging(config.name, config.n_layers, grid, spec, groups_bytes, batch * one.d * grid.rows * 4)
    # The plan of a middle stage: its layers and the buffers (the first and last stages hold
    # fewer layers beside the embedding or the head, within the same budget).
    stage_layout = WaferLayout(with_layers(config, staging.layers_per_stage), grid, context, mode=mode)
    middle = [s for s in layout_specs(stage_layout, batch, dtype) if s.name.startswith(f"{LAYERS}.")
              or s.kind is Kind.BUFFER]
    plan = plan_sram(middle, grid.rows, grid.cols, spec, stage_layout.useful_bytes(middle))

    t1, t2 = (trace_decode_step(lay, batch, opts, dtype) for lay in (one, two))
    k1, k2 = (kernel_times(t, spec, kernel_of) for t in (t1, t2))
    names = sorted(set(k1) | set(k2))
    per_layer = {g: _combine(k2.get(g, _zero(g)), k1.get(g, _zero(g)), 1, -1) for g in names}
    per_layer = {g: k for g, k in per_layer.items() if k.time_s > 0 or k.flops > 0}
    L = config.n_layers
    if accounting is Accounting.FULL:
        per_token = {g: _combine(k1.get(g, _zero(g)), per_layer.get(g, _zero(g)), 1, L - 1) for g in names}
    else:
        per_token = {g: _combine(k, k, L, 0) for g, k in per_layer.items()}
    layer_calls = price_calls([c for c in t2.collectives if c.scope.startswith(f"{layer_scope(1)}/")], spec)
    return LayoutProfile(config, spec, grid, schedule, groups, batch, context, dtype, plan, groups_bytes.layer,
                         staging, per_layer, per_token, layer_calls, t1.jaxpr_eqns + t2.jaxpr_eqns, mode,
                         accounting)
