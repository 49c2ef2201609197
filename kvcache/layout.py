"""Where one sequence's KV cache lies on the prefill mesh, and how the wire describes it.

Three layouts of one layer's keys (values alike), for one sequence of S positions:

  logical  [K, S, H]                  K true KV heads, positions 0..S-1, C order: the wire layout
  prefill  [K_col, S, H] on row r     KV heads over the prefill mesh's columns, zero-padded to a
                                      multiple of C (kc = ceil(K / C) per column); positions and
                                      head dim local; the batch is dealt over rows, so a sequence
                                      lives on the C devices of one row
  decode   [R, C, kc, s + 1, H]       KV heads over the decode mesh's columns (padded as above);
                                      positions cyclic over rows: p lives on row p % R at slot
                                      p // R; the last slot of each row is the scratch slot the
                                      decode step writes when it does not own a position
                                      (model/cache_layout.py: the layout the decode step writes)

Converting prefill -> logical drops the padding heads (their rows are exact zeros, never data);
logical -> decode scatters positions to rows and zero-fills the rest, so a conversion only ever
moves bytes: it is exact for every pair of grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from mesh.axes import COL, ROW
from mesh.errors import WaferError
from mesh.grid import Grid
from mesh.extent import ceil_div


@dataclasses.dataclass(frozen=True)
class PrefillKVLayout:
    """One sequence's cache on the prefill mesh: `KV[K_col, S, H]` on mesh row `row`."""

    grid: Grid  # the prefill mesh R×C
    kv_heads: int  # K, before padding
    row: int = 0  # the mesh row that holds this sequence (batch over rows)

    # Which logical dimension lies along which mesh axis (None: local to every core).
    AXES: ClassVar[dict] = {"B": ROW, "K": COL, "S": None, "H": None}

    def __post_init__(self):
        if self.kv_heads < 1:
            raise WaferError(f"layout: KV heads must be positive, got {self.kv_heads}")
        if not 0 <= self.row < self.grid.rows:
            raise WaferError(f"layout: row {self.row} is outside the {self.grid} prefill mesh")

    @property
    def kc(self) -> int:  # KV heads per column
        return ceil_div(self.kv_heads, self.grid.cols)

    @property
    def padded_heads(self) -> int:
        return self.kc * self.grid.cols

    def heads_of_column(self, c: int) -> range:
        """The true KV heads column c holds (the rest of its kc are padding)."""
        return range(c * self.kc, min((c + 1) * self.kc, self.kv_heads))

    def to_json(self) -> dict:
        return {"mesh": "prefill", "grid": [self.grid.rows, self.grid.cols], "row": self.row,
                "axes": dict(self.AXES), "padded": {"K": self.padded_heads}}

    @classmethod
    def from_json(cls, d, kv_heads: int) -> PrefillKVLayout:
        """Parse and check a layout description; any disagreement is a WaferError naming it."""
        if not isinstance(d, dict) or set(d) != {"mesh", "grid", "row", "axes", "padded"}:
            raise WaferError(f"layout mismatch: expected keys mesh, grid, row, axes, padded; got {_keys(d)}")
        if d["mesh"] != "prefill":
            raise WaferError(f"layout mismatch: source mesh {d['mesh']!r}, expected 'prefill'")
        if d["axes"] != cls.AXES:
            raise WaferError(f"layout mismatch: axes {d['axes']!r}, expected {cls.AXES!r}")
        grid = d["grid"]
        if (not isinstance(grid, list) or len(grid) != 2 or not all(_is_int(g) and 1 <= g <= 1 << 20 for g in grid)):
            raise WaferError(f"layout mismatch: grid {grid!r} is not [rows, cols] of positive integers")
        if not _is_int(d["row"]):
            raise WaferError(f"layout mismatch: row {d['row']!r} is not an integer")
        layout = cls(Grid(*grid), kv_heads, d["row"])
        if d["padded"] != {"K": layout.padded_heads}:
            raise WaferError(f"layout mismatch: padded {d['padded']!r}, but {kv_heads} KV heads over "
                             f"{grid[1]} columns pad to {layout.padded_heads}")
        return layout

    def shards(self, k_KSH: np.ndarray) -> list[np.ndarray]:
        """logical [K, S, H] -> per-column shards [kc, S, H] (padding heads zero), columns in order."""
        K, S, H = k_KSH.shape
        padded = np.zeros((self.padded_heads, S, H), k_KSH.dtype)
        padded[:K] = k_KSH
        return [padded[c * self.kc:(c + 1) * self.kc] for c in range(self.grid.cols)]

    def logical_pieces(self, shards: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Per-column shards -> the logical [K, S, H] as consecutive pieces, padding dropped.

        The columns split K, the leading axis of the C-order logical array, so each column's true
        heads are one contiguous run of it: no concatenation, only views."""
        for c, shard in enumerate(shards):
            heads = len(self.heads_of_column(c))
            if heads:
                yield shard[:heads]

    def to_logical(self, shards: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(self.logical_pieces(shards)), axis=0)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _keys(d) -> str:
    return ", ".join(sorted(map(str, d))) if isinstance(d, dict) else type(d).__name__
