"""The SRAM planner: every byte a core holds, checked against its budget before anything runs.

The planner knows nothing of models: it reads a list of `TensorSpec`s (mesh/tensor_spec.py: what
each core holds, described once by the layout that places it) and sums them per core and per kind.
"""

from __future__ import annotations

import dataclasses

from mesh.errors import WaferError
from mesh.tensor_spec import Kind, TensorSpec
from mesh.wafer import WaferSpec


@dataclasses.dataclass(frozen=True)
class SramPlan:
    rows: int
    cols: int
    tensors: tuple[TensorSpec, ...]
    budget: int
    useful_bytes: int | None = None  # over the whole grid, bytes that are not padding (the layout's count)

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes per core of each kind (every core holds the same extents in these layouts)."""
        out = {k.value: 0 for k in Kind}
        for t in self.tensors:
            out[t.kind.value] += t.local_bytes
        return out

    @property
    def per_core_bytes(self) -> int:
        return sum(t.local_bytes for t in self.tensors)

    @property
    def headroom(self) -> int:
        return self.budget - self.per_core_bytes

    @property
    def useful_fraction(self) -> float | None:
        """Non-padding bytes / placed bytes over the grid, every placed tensor counted (None: the
        layout gave no count).

        Placed bytes are the plan's: weights, KV cache and activation buffers alike. The layout
        counts what is not padding: the elements its logical extents fill, in buffers as in
        weights (a buffer is not padding, but its rounding of D or V is). A replicated KV head
        counts on each core that holds it (each attends with its own copy); the cache's scratch
        slot is not useful (model/wafer_layout.py)."""
        if self.useful_bytes is None:
            return None
        return self.useful_bytes / (self.per_core_bytes * self.rows * self.cols)


def plan_sram(tensors: list[TensorSpec], rows: int, cols: int, spec: WaferSpec,
              useful_bytes: int | None = None) -> SramPlan:
    """Account every tensor on every core; refuse a plan that does not fit the budget.

    `useful_bytes`: the bytes of `tensors` over the grid that are not padding, as the layout that
    places them counts them (the planner knows nothing of models); the plan reports
    `useful_fraction` from it.

    The error names the grid and core, the largest tensor of the overflowing core, and the
    shortfall, so a user knows what to shrink.
    """
    if rows > spec.max_rows or cols > spec.max_cols:
        raise WaferError(f"grid {rows}x{cols} exceeds {spec.name}'s {spec.max_rows}x{spec.max_cols} cores")
    plan = SramPlan(rows, cols, tuple(tensors), spec.sram_per_core, useful_bytes)
    if plan.per_core_bytes > spec.sram_per_core:
        biggest = max(tensors, key=lambda t: t.local_bytes)
        raise WaferError(
            f"layout does not fit {spec.name} on a {rows}x{cols} grid: core (0, 0) needs "
            f"{plan.per_core_bytes:,} B of {spec.sram_per_core:,} B (short by "
            f"{plan.per_core_bytes - spec.sram_per_core:,} B); largest tensor {biggest.name} "
            f"{biggest.local_shape} = {biggest.local_bytes:,} B")
    return plan
