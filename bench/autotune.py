"""The grid autotuner: the fastest grid whose stages fit, from profiles of a few candidates."""

from __future__ import annotations

from typing import Callable

from kernels.allreduce import Schedule
from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from model.trace_decode import Accounting, LayoutProfile, profile_layout

# Grids the autotuner tries (rows x columns, clipped to the wafer): a few per side, chosen so a
# whole search stays under a minute; rows split D, columns split heads, F and V.
AUTOTUNE_ROWS = (360, 480, 750)
AUTOTUNE_COLS = (96, 128, 240, 360)


def autotune_candidates(spec: WaferSpec) -> list[Grid]:
    """The candidate grids on `spec`: AUTOTUNE_ROWS x AUTOTUNE_COLS, clipped to the wafer."""
    rows = sorted({min(r, spec.max_rows) for r in AUTOTUNE_ROWS})
    cols = sorted({min(c, spec.max_cols) for c in AUTOTUNE_COLS})
    return [Grid(r, c) for r in rows for c in cols]


def autotune_grid(config: ModelConfig, spec: WaferSpec, schedule: Schedule, batch: int, context: int,
                  dtype: str, candidates: list[Grid] | None = None, groups: int | None = None,
                  accounting: Accounting = Accounting.FULL,
                  on_candidate: Callable[[], None] = lambda: None) -> list[LayoutProfile]:
    """Profiles of every candidate grid that fits (default: `autotune_candidates(spec)`), fastest
    first (raises if none fits); `on_candidate` is called after each candidate, fitting or not."""
    found, last_error = [], None
    for grid in autotune_candidates(spec) if candidates is None else candidates:
        try:
            found.append(profile_layout(config, grid, spec, schedule, groups, batch, context, dtype,
                                        accounting=accounting))
        except WaferError as e:
            last_error = e
        on_candidate()
    if not found:
        raise WaferError(f"no candidate grid fits {config.name} on {spec.name}: {last_error}")
    return sorted(found, key=lambda p: p.token_s)
