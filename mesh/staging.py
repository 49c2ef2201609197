"""Multi-wafer staging: how a model's layers are cut into stages of one grid each, on how many wafers.

A stage is one grid, a region of a wafer, holding as many layers as fit its cores' SRAM beside
the embedding, the LM head and the step's buffers; layers fill a region, regions are placed side
by side on a wafer ((max_rows // R) x (max_cols // C) of them) and, when a wafer is full, on more
wafers. With the full-grid layout this gives the published setups: Llama3-8B (16-bit) on one
WSE-2 (four 360x360 regions) and Llama-3.1-70B (16-bit, 2048 positions) on four WSE-3. A token passes every stage in turn, so stages add time, not speed. Like the SRAM
planner, staging knows nothing of models: it reads the bytes per core of each placement group.
"""

from __future__ import annotations

import dataclasses

from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.extent import ceil_div
from mesh.wafer import WaferSpec


@dataclasses.dataclass(frozen=True)
class StageBytes:
    """Bytes per core of each placement group."""

    layer: int  # one layer: its weights and KV cache
    embed: int  # the embedding table (a tied model's LM head tile)
    head: int  # the final norm and the LM head
    buffer: int  # the step's live activations, held by every stage


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


def plan_staging(model: str, n_layers: int, grid: Grid, spec: WaferSpec, groups: StageBytes,
                 x_bytes: int) -> Staging:
    """Stages of `grid` for `n_layers` layers of `model` (a name for errors) on `spec` wafers;
    `x_bytes`: the activations a stage hands to the next (all rows' slices). Raises WaferError if
    a stage cannot fit."""
    budget, layer, L = spec.sram_per_core, groups.layer, n_layers
    room = budget - groups.buffer
    per_stage = min(L, room // layer) if room > 0 else 0
    if per_stage < 1 or groups.embed > room or groups.head > room:
        need = max(layer, groups.embed, groups.head)
        raise WaferError(
            f"{model} does not fit {spec.name} on a {grid} grid: a stage needs {need + groups.buffer:,} B "
            f"per core (one layer {layer:,} B, embedding {groups.embed:,} B, head {groups.head:,} B, "
            f"buffers {groups.buffer:,} B) of {budget:,} B (short by {need + groups.buffer - budget:,} B)")
    # The first and last stages fill with layers after the embedding and the head.
    first = min(L, (room - groups.embed) // layer)
    last = min(L - first, (room - groups.head) // layer) if L > first else 0
    rest = L - first - last
    if rest == 0 and first + last == L and first == L and groups.embed + groups.head + L * layer <= room:
        stages = 1
    else:
        stages = 2 + ceil_div(rest, per_stage)
    per_wafer = (spec.max_rows // grid.rows) * (spec.max_cols // grid.cols)
    wafers = ceil_div(stages, per_wafer)
    # A hand-off streams each row's slice of x to the next grid: stage start-up, about one grid
    # side of hops, the slice's words over that row's link; between wafers, the systems' I/O
    # (`WaferSpec.wafer_hop_s`). The last stage sends the chosen token back to the first.
    on_wafer = (spec.stage_cycles + max(grid.rows, grid.cols) * spec.hop_cycles
                + x_bytes / grid.rows / spec.link_bytes_per_cycle) / spec.clock_hz
    handoffs = stages if stages > 1 else 0
    crossings = wafers if wafers > 1 else 0
    return Staging(per_stage, stages, per_wafer, wafers, handoffs * on_wafer + crossings * spec.wafer_hop_s(x_bytes))
