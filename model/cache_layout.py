"""The decode layout of one slot's KV cache: where the wafer decode step keeps each position.

One layer's keys (values alike) of one sequence of S positions, logical [K, S, H] (the wire
layout, kvcache/layout.py), lie on the decode mesh as per-core [R, C, kc, s + 1, H]: KV heads over
the columns (padded, or replicated when there are more columns than KV heads), positions cyclic
over rows (p on row p % R at slot p // R), and the last slot of each row the scratch slot the step
writes when it does not own a position. The conversion only moves bytes: it is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.extent import ceil_div
from model.wafer_layout import WaferLayout


@dataclasses.dataclass(frozen=True)
class DecodeKVLayout:
    """One slot of the decode cache: `KV[K_col, S_row(cyclic), H]` as per-core [R, C, kc, s + 1, H].

    Column c holds the kc KV heads `heads_of(c)` (None: a zero padding head). By default these are
    contiguous blocks of K; a decode layout with more columns than KV heads replicates each head
    on several columns (`model/wafer_layout.py`) and passes its map as `column_heads`. Position p
    lies on row p % R at slot p // R; slot s of every row is the scratch slot, always zero here.
    """

    grid: Grid  # the decode mesh R×C
    kv_heads: int  # K, before padding
    positions_per_row: int  # s: cache positions each row holds (the scratch slot excluded)
    column_heads: tuple[tuple[int | None, ...], ...] | None = None  # per column its kc KV heads

    def __post_init__(self):
        if self.column_heads is not None:
            if len(self.column_heads) != self.grid.cols or len({len(h) for h in self.column_heads}) != 1:
                raise WaferError(f"decode layout: need the same number of KV heads for each of {self.grid.cols} "
                                 f"columns, got {self.column_heads}")
            held = {h for heads in self.column_heads for h in heads if h is not None}
            if held != set(range(self.kv_heads)):
                raise WaferError(f"decode layout: columns hold KV heads {sorted(held)}, the model has {self.kv_heads}")

    @property
    def kc(self) -> int:
        if self.column_heads is not None:
            return len(self.column_heads[0])
        return ceil_div(self.kv_heads, self.grid.cols)

    def heads_of(self, c: int) -> tuple[int | None, ...]:
        if self.column_heads is not None:
            return self.column_heads[c]
        return tuple(h if h < self.kv_heads else None for h in range(c * self.kc, (c + 1) * self.kc))

    @property
    def capacity(self) -> int:  # positions the slot holds
        return self.positions_per_row * self.grid.rows

    def to_cores(self, k_KSH: np.ndarray) -> np.ndarray:
        """logical [K, S, H] (S <= capacity) -> per-core [R, C, kc, s + 1, H], zeros elsewhere."""
        R, C, kc = self.grid.rows, self.grid.cols, self.kc
        K, S, H = k_KSH.shape
        if K != self.kv_heads:
            raise WaferError(f"cache has {K} KV heads, the decode layout {self.kv_heads}")
        if S > self.capacity:
            raise WaferError(f"cache of {S} positions does not fit {self.capacity} decode positions")
        out = np.zeros((R, C, kc, self.positions_per_row + 1, H), np.float32)
        for r in range(R):
            rows = k_KSH[:, r::R]  # positions r, r + R, ...: slots 0, 1, ... of row r
            for c in range(C):
                for i, h in enumerate(self.heads_of(c)):
                    if h is not None:
                        out[r, c, i, : rows.shape[1]] = rows[h]
        return out

    def from_cores(self, cores: np.ndarray, S: int) -> np.ndarray:
        """The inverse of `to_cores` for the first S positions: [R, C, kc, s + 1, H] -> [K, S, H]
        (a replicated head is read from the first column that holds it)."""
        R, C = self.grid.rows, self.grid.cols
        H = cores.shape[-1]
        first = {}
        for c in range(C):
            for i, h in enumerate(self.heads_of(c)):
                if h is not None:
                    first.setdefault(h, (c, i))
        out = np.empty((self.kv_heads, S, H), cores.dtype)
        for r in range(R):
            m = len(range(r, S, R))
            for h, (c, i) in first.items():
                out[h, r::R] = cores[r, c, i, :m]
        return out


def decode_kv_layout(layout: WaferLayout) -> DecodeKVLayout:
    """The decode layout of one slot's cache under `layout` (which KV heads each column holds)."""
    return DecodeKVLayout(layout.grid, layout.config.n_kv_heads, layout.s, layout.kv_heads_by_column)


def cache_to_decode_layout(k_KSH: np.ndarray, layout: WaferLayout) -> np.ndarray:
    """One sequence's cache [K, S', H] (S' <= S) -> per-core slices [R, C, kc, s+1, H].

    Entry [r, c, i, j] is KV head layout.column_heads(c)[0][i] (KV heads along COL) at position
    p = j * R + r (positions dealt cyclically along ROW). With more columns than KV heads a head
    lies on each of its rep columns (replicated); padded heads (None), positions >= S' and the
    last slot j = s of each row (the scratch slot) are zero.
    """
    return decode_kv_layout(layout).to_cores(np.asarray(k_KSH))
