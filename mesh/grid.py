"""The names of a core grid and of its executors: plain values, no JAX.

They live apart from `mesh/executors.py` (which builds JAX meshes) so that the CLI and the
serving options can parse and carry them without starting JAX (`wafer --help` and `wafer simulate`
stay fast, and JAX is imported only after the mesh flags have set the CPU device count).
"""

from __future__ import annotations

import dataclasses
import enum

from mesh.errors import WaferError


class Executor(enum.Enum):
    DEVICES = "devices"
    VCORES = "vcores"
    TRACE = "trace"


@dataclasses.dataclass(frozen=True)
class Grid:
    """An R×C grid of cores."""

    rows: int  # R
    cols: int  # C

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise WaferError(f"grid {self.rows}x{self.cols}: both sides must be positive")

    @property
    def cores(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @classmethod
    def parse(cls, text: str) -> Grid:
        """'RxC' (e.g. '2x4'), or 'N' for a 1×N grid."""
        parts = text.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise WaferError(f"mesh {text!r}: expected RxC such as 2x4") from None
        if len(dims) == 1:
            dims = [1, dims[0]]
        if len(dims) != 2:
            raise WaferError(f"mesh {text!r}: expected RxC such as 2x4")
        return cls(*dims)
