"""One description per tensor a core holds, and the tiling into `[R, C, *local]` derived from it.

A `TensorSpec` names a tensor, its kind, and for each local axis the logical dimension that lies
along it and the mesh axis that dimension is split over (ROW, COL, or None: whole on every
core). Its per-core shape, bytes, abstract value and its tiling of a global array into the
executors' `[R, C, *local]` (mesh/executors.py) all follow from that one description; the SRAM
planner (mesh/planner.py) and the profiler read the same specs.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import einops
import numpy as np

from mesh.axes import COL, ROW
from mesh.executors import Grid


class Kind(enum.Enum):
    WEIGHT = "weight"
    KV = "kv"
    BUFFER = "buffer"  # activations and scratch that live during a step


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor every core holds a slice of.

    `axes[i] = (logical dimension, mesh axis)` describes local axis i: `("D", ROW)` is a block of
    D per mesh row (written `W[D_row, ...]` in docstrings), `("H", None)` a dimension every core
    holds whole.
    """

    name: str
    kind: Kind
    local_shape: tuple[int, ...]
    axes: tuple[tuple[str, str | None], ...]
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.axes) != len(self.local_shape):
            raise ValueError(f"{self.name}: {len(self.axes)} axes for local shape {self.local_shape}")
        for mesh_axis in (ROW, COL):
            if sum(a == mesh_axis for _, a in self.axes) > 1:
                raise ValueError(f"{self.name}: more than one local axis split over {mesh_axis}")

    @property
    def local_bytes(self) -> int:
        return math.prod(self.local_shape) * np.dtype(self.dtype).itemsize

    def split_axis(self, mesh_axis: str) -> int | None:
        """The local axis whose dimension is split over `mesh_axis` (None: replicated along it)."""
        return next((i for i, (_, a) in enumerate(self.axes) if a == mesh_axis), None)

    def padded_shape(self, grid: Grid) -> tuple[int, ...]:
        """The global (padded) shape whose blocks are the local tiles of `grid`."""
        scale = {ROW: grid.rows, COL: grid.cols, None: 1}
        return tuple(n * scale[a] for n, (_, a) in zip(self.local_shape, self.axes))

    def tile(self, a: np.ndarray, grid: Grid) -> np.ndarray:
        """A padded global array [..] -> the cores' tiles [R, C, *local_shape]."""
        if a.shape != self.padded_shape(grid):
            raise ValueError(f"{self.name}: global shape {a.shape}, the spec tiles {self.padded_shape(grid)} "
                             f"on a {grid} grid")
        return tile_to_cores(a, grid, self.split_axis(ROW), self.split_axis(COL))


def tile_to_cores(a: np.ndarray, grid: Grid, row_axis: int | None = None, col_axis: int | None = None) -> np.ndarray:
    """[..] -> [R, C, ..local]: axis `row_axis` split in R blocks over the mesh rows, `col_axis`
    in C blocks over the columns (each a multiple already); an axis of None is replicated."""
    names = [f"a{i}" for i in range(a.ndim)]
    left = [f"(r {n})" if i == row_axis else f"(c {n})" if i == col_axis else n for i, n in enumerate(names)]
    pattern = f"{' '.join(left)} -> r c {' '.join(names)}"
    return np.ascontiguousarray(einops.repeat(a, pattern, r=grid.rows, c=grid.cols))
