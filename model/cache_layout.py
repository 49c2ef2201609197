"""The decode layout of one slot's KV cache: where the wafer decode step keeps each position.

One layer's keys (values alike) of one sequence of S positions, logical [K, S, H] (the wire
layout, kvcache/layout.py), lie on the decode mesh as per-core [R, C, kc, s + 1, h]: KV heads over
the columns (padded, or replicated when there are more columns than KV heads), each column holding
h of the head dimensions (all H, or in the full-grid layout its slice of them), positions cyclic
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
    """One slot of the decode cache: `KV[K_col, S_row(cyclic), H]` as per-core [R, C, kc, s + 1, h].

    Column c holds the kc KV heads `heads_of(c)` (None: a zero padding head). By default these are
    contiguous blocks of K; a decode layout with more columns than KV heads replicates each head
    on several columns (`model/wafer_layout.py`) and passes its map as `column_heads`. Each column
    holds head dimensions `column_dims[c]` of its heads (default: all H in order; the full-grid
    layout gives each column a slice; None: a zero padding dimension). Position p lies on row
    p % R at slot p // R; slot s of every row is the scratch slot, always zero here.
    """

    grid: Grid  # the decode mesh R×C
    kv_heads: int  # K, before padding
    positions_per_row: int  # s: cache positions each row holds (the scratch slot excluded)
    column_heads: tuple[tuple[int | None, ...], ...] | None = None  # per column its kc KV heads
    column_dims: tuple[tuple[int | None, ...], ...] | None = None  # per column its h head dimensions

    def __post_init__(self):
        if self.column_heads is not None:
            if len(self.column_heads) != self.grid.cols or len({len(h) for h in self.column_heads}) != 1:
                raise WaferError(f"decode layout: need the same number of KV heads for each of {self.grid.cols} "
                                 f"columns, got {self.column_heads}")
            held = {h for heads in self.column_heads for h in heads if h is not None}
            if held != set(range(self.kv_heads)):
                raise WaferError(f"decode layout: columns hold KV heads {sorted(held)}, the model has {self.kv_heads}")
        if self.column_dims is not None and (len(self.column_dims) != self.grid.cols
                                             or len({len(d) for d in self.column_dims}) != 1):
            raise WaferError(f"decode layout: need the same number of head dimensions for each of {self.grid.cols} "
                             f"columns, got {self.column_dims}")

    def dims_of(self, c: int, H: int) -> np.ndarray:
        """Column c's head dimensions as indices into H (-1: padding)."""
        if self.column_dims is None:
            return np.arange(H)
        return np.array([-1 if i is None else i for i in self.column_dims[c]], np.int64)

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
        """logical [K, S, H] (S <= capacity) -> per-core [R, C, kc, s + 1, h], zeros elsewhere."""
        R, C, kc = self.grid.rows, self.grid.cols, self.kc
        K, S, H = k_KSH.shape
        if K != self.kv_heads:
            raise WaferError(f"cache has {K} KV heads, the decode layout {self.kv_heads}")
        if S > self.capacity:
            raise WaferError(f"cache of {S} positions does not fit {self.capacity} decode positions")
        h = len(self.dims_of(0, H))
        out = np.zeros((R, C, kc, self.positions_per_row + 1, h), k_KSH.dtype)
        for c in range(C):
            dims = self.dims_of(c, H)
            real = dims >= 0
            for i, head in enumerate(self.heads_of(c)):
                if head is None:
                    continue
                sliced = k_KSH[head][:, np.maximum(dims, 0)] * real  # [S, h], padding dims zero
                for r in range(R):
                    rows = sliced[r::R]  # positions r, r + R, ...: slots 0, 1, ... of row r
                    out[r, c, i, : rows.shape[0]] = rows
        return out

    def from_cores(self, cores: np.ndarray, S: int) -> np.ndarray:
        """The inverse of `to_cores` for the first S positions: [R, C, kc, s + 1, h] -> [K, S, H]
        (a replicated head, or head dimension, is read from the first column that holds it)."""
        R, C = self.grid.rows, self.grid.cols
        H = self.head_dim(cores.shape[-1])
        out = np.zeros((self.kv_heads, S, H), cores.dtype)
        seen = set()
        for c in range(C):
            dims = self.dims_of(c, H)
            for i, head in enumerate(self.heads_of(c)):
                for t, dim in enumerate(dims):
                    if head is None or dim < 0 or (head, dim) in seen:
                        continue
                    seen.add((head, dim))
                    for r in range(R):
                        m = len(range(r, S, R))
                        out[head, r::R, dim] = cores[r, c, i, :m, t]
        return out

    def head_dim(self, h: int) -> int:
        """H, from the local extent h of a core's cache."""
        if self.column_dims is None:
            return h
        return 1 + max(i for dims in self.column_dims for i in dims if i is not None)


def decode_kv_layout(layout: WaferLayout) -> DecodeKVLayout:
    """The decode layout of one slot's cache under `layout` (which KV heads each column holds)."""
    dims = layout.dims_by_column if layout.seg > 1 else None
    return DecodeKVLayout(layout.grid, layout.config.n_kv_heads, layout.s, layout.kv_heads_by_column, dims)


def cache_to_decode_layout(k_KSH: np.ndarray, layout: WaferLayout) -> np.ndarray:
    """One sequence's cache [K, S', H] (S' <= S) -> per-core slices [R, C, kc, s+1, hc].

    Entry [r, c, i, j, t] is KV head layout.column_heads(c)[0][i] (KV heads along COL), head
    dimension layout.column_dims(c)[t], at position p = j * R + r (positions dealt cyclically
    along ROW). With more columns than KV heads a head
    lies on each of its rep columns (replicated); padded heads (None), positions >= S' and the
    last slot j = s of each row (the scratch slot) are zero.
    """
    return decode_kv_layout(layout).to_cores(np.asarray(k_KSH))
