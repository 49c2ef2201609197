"""How a model's weights and KV cache are cut into per-core tiles on an R×C grid.

Every tensor a core holds is stored globally as [R, C, *local] (see mesh/executors.py). The
layout alternates which axis a GEMV reduces over, so each output already lies where the next
GEMV wants its input:

  x        [D_row]                 residual stream: D split over rows, replicated over columns
  w_qkv    [D_row, heads_col]      reduce over ROW -> q, k, v of column c's heads on every row
  KV cache [heads_col, S_row]      KV heads over columns, positions over rows (cyclic: p % R)
  w_o      [heads_col, D_row]      reduce over COL -> residual update [D_row]
  w_gate_up[D_row, F_col]          reduce over ROW -> [F_col]
  w_down   [F_col, D_row]          reduce over COL -> [D_row]
  lm       [D_row, V_col]          reduce over ROW -> logits [V_col]; also the embedding table

How heads lie over the C columns (K KV heads, G = N/K query heads each):

- C <= K (rep = 1): column c holds kc = ceil(K/C) whole KV groups, KV heads c*kc .. c*kc+kc-1,
  each with all G of its query heads (gc = G); KV heads >= K are zero padding.
- C > K (replicated KV): column c holds one KV head (kc = 1) and gc = ceil(G / min(G, C // K))
  of its query heads. KV head h lies on rep = ceil(G / gc) neighbouring columns h*rep ..
  h*rep+rep-1; column h*rep + j holds query heads h*G + j*gc .. h*G + j*gc + gc - 1, those past
  the group's G being zero padding; columns >= K*rep hold no head at all (zero padding for
  attention, their blocks of F and V as usual). Each of the rep columns holds the KV head's k and
  v projection weights and its KV-cache slice, and computes its k and v itself: the price of
  replication is rep-fold work on k and v, and rep-fold KV-cache bytes over the wafer; no
  collective is added (each column attends its own query heads against its own copy, and the
  reduction over COL after w_o sums the columns' contributions as before).
  rep = ceil(G / gc) rather than min(G, C // K): same per-core shapes, fewer padded query heads.

The split is automatic: a core's w_qkv, w_o, KV cache, attention FLOPs and messages are never
larger than with whole groups (gc <= G, kc = 1 either way once C >= K), so it never loses on a
wafer, where one core's time is the grid's. `split_groups=False` keeps whole groups for any C
(the prefill mesh, whose cache layout and handoff read KV head c*kc + i on column c).

Dimensions that do not divide the grid are zero-padded: D to a multiple of R, KV heads and query
heads as above, F and V to multiples of C, S to a multiple of R. Zero rows and columns contribute
exact zeros to every sum (a zero query head's attention output meets zero rows of w_o), norms
divide by the true D, and padded vocabulary entries are masked out of the argmax, so padding
never changes a result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mesh.executors import Grid
from mesh.planner import Kind, TensorSpec
from model.config import ModelConfig
from model.weights import Params


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class WaferLayout:
    """Per-core extents of every dimension for one model on one grid."""

    config: ModelConfig
    grid: Grid
    max_len: int  # S: cache positions per sequence (before padding to the grid)
    split_groups: bool = True  # with more columns than KV heads, split groups and replicate KV (above)

    @property
    def d(self) -> int:  # local D per row
        return _ceil_div(self.config.dim, self.grid.rows)

    @property
    def _split(self) -> bool:
        return self.split_groups and self.grid.cols > self.config.n_kv_heads

    @property
    def kc(self) -> int:  # KV heads per column
        return 1 if self._split else _ceil_div(self.config.n_kv_heads, self.grid.cols)

    @property
    def gc(self) -> int:  # query heads per column of each of its KV heads
        G = self.config.q_per_kv
        return _ceil_div(G, min(G, self.grid.cols // self.config.n_kv_heads)) if self._split else G

    @property
    def rep(self) -> int:  # columns per KV head (1: whole groups)
        return _ceil_div(self.config.q_per_kv, self.gc) if self._split else 1

    @property
    def nc(self) -> int:  # query heads per column
        return self.kc * self.gc

    def column_heads(self, c: int) -> tuple[list[int | None], list[int | None]]:
        """Column c's KV heads (kc of them) and query heads (nc, grouped by KV head); None: padding."""
        K, G = self.config.n_kv_heads, self.config.q_per_kv
        kv, q = [], []
        for a in range(self.kc):
            h = (c // self.rep) * self.kc + a
            first = (c % self.rep) * self.gc
            real = h < K
            kv.append(h if real else None)
            q += [h * G + first + i if real and first + i < G else None for i in range(self.gc)]
        return kv, q

    @property
    def f(self) -> int:  # local F per column
        return _ceil_div(self.config.ffn_dim, self.grid.cols)

    @property
    def v(self) -> int:  # local V per column
        return _ceil_div(self.config.vocab_size, self.grid.cols)

    @property
    def s(self) -> int:  # cache positions per row
        return _ceil_div(self.max_len, self.grid.rows)

    @property
    def s_slots(self) -> int:
        """Cache slots per row: s positions plus one scratch slot. Every row writes the new K and
        V each step; rows that do not own the position write into the scratch slot, which is
        never attended to. A plain write then never reads the cache first, which kept XLA
        from updating the cache in place (it copied every layer's cache every step)."""
        return self.s + 1

    @property
    def qkv_width(self) -> int:  # local width of the fused QKV output: q | k | v of column c
        return (self.nc + 2 * self.kc) * self.config.head_dim

    def tensor_specs(self, batch: int) -> list[TensorSpec]:
        """Every tensor a core holds during decode: the single description that placement, the
        SRAM planner and the profiler all read."""
        cfg, H, W, KV, BUF = self.config, self.config.head_dim, Kind.WEIGHT, Kind.KV, Kind.BUFFER
        specs = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            specs += [TensorSpec(p + "attn_norm", W, (self.d,)), TensorSpec(p + "w_qkv", W, (self.d, self.qkv_width))]
            if cfg.qkv_bias:
                specs.append(TensorSpec(p + "b_qkv", W, (self.qkv_width,)))
            specs += [TensorSpec(p + "w_o", W, (self.nc * H, self.d)), TensorSpec(p + "mlp_norm", W, (self.d,)),
                      TensorSpec(p + "w_gate_up", W, (self.d, 2 * self.f)), TensorSpec(p + "w_down", W, (self.f, self.d)),
                      TensorSpec(p + "k_cache", KV, (batch, self.kc, self.s_slots, H)),
                      TensorSpec(p + "v_cache", KV, (batch, self.kc, self.s_slots, H))]
        specs += [TensorSpec("final_norm", W, (self.d,)), TensorSpec("lm", W, (self.d, self.v))]
        if not cfg.tie_embeddings:
            specs.append(TensorSpec("embed", W, (self.v, self.d)))
        # Live activations of one step (the largest set alive at once, reused layer to layer).
        specs += [TensorSpec("x", BUF, (batch, self.d)), TensorSpec("qkv", BUF, (batch, self.qkv_width)),
                  TensorSpec("scores", BUF, (batch, self.nc, self.s_slots)), TensorSpec("gate_up", BUF, (batch, 2 * self.f)),
                  TensorSpec("logits", BUF, (batch, self.v))]
        return specs


def _pad_to(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return np.pad(a, pad)


def _tile(a: np.ndarray, row_axis: int | None, col_axis: int | None, grid: Grid) -> np.ndarray:
    """[..] -> [R, C, ..local]: split `row_axis` over rows and `col_axis` over columns
    (each already padded to a multiple); an axis of None is replicated."""
    R, C = grid.rows, grid.cols
    out = np.empty((R, C), dtype=object)
    for r in range(R):
        for c in range(C):
            idx = [slice(None)] * a.ndim
            if row_axis is not None:
                n = a.shape[row_axis] // R
                idx[row_axis] = slice(r * n, (r + 1) * n)
            if col_axis is not None:
                n = a.shape[col_axis] // C
                idx[col_axis] = slice(c * n, (c + 1) * n)
            out[r, c] = a[tuple(idx)]
    return np.stack([np.stack(list(row)) for row in out])


def _take_heads(w: np.ndarray, heads: list[int | None], H: int) -> np.ndarray:
    """Heads (blocks of H along the last axis) of `w` in the order given; None: a zero head."""
    zero = np.zeros(w.shape[:-1] + (H,), w.dtype)
    return np.concatenate([zero if h is None else w[..., h * H: (h + 1) * H] for h in heads], axis=-1)


def _head_major(w: np.ndarray, layout: WaferLayout) -> np.ndarray:
    """Reorder a fused QKV output axis (last) from q|k|v into column-major groups: for each
    column c, [its query heads | its k heads | its v heads] (layout.column_heads, padding zero;
    a replicated KV head's k and v appear on each of its columns)."""
    cfg = layout.config
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = w[..., : N * H], w[..., N * H: (N + K) * H], w[..., (N + K) * H:]
    cols = []
    for c in range(layout.grid.cols):
        kv_heads, q_heads = layout.column_heads(c)
        cols += [_take_heads(q, q_heads, H), _take_heads(k, kv_heads, H), _take_heads(v, kv_heads, H)]
    return np.concatenate(cols, axis=-1)


def tile_params(params: Params, layout: WaferLayout) -> dict:
    """Per-core tiles [R, C, *local] of every weight, from single-device params."""
    cfg, grid = layout.config, layout.grid
    Dp, Fp, Vp = layout.d * grid.rows, layout.f * grid.cols, layout.v * grid.cols
    H = cfg.head_dim

    def vec_d(w):  # [D] -> rows
        return _tile(_pad_to(np.asarray(w, np.float32), 0, Dp), 0, None, grid)

    layers = []
    for lp in params["layers"]:
        w_qkv = _head_major(_pad_to(np.asarray(lp["w_qkv"], np.float32), 0, Dp), layout)
        F = cfg.ffn_dim
        gate_up = np.asarray(lp["w_gate_up"], np.float32)
        gate = _pad_to(_pad_to(gate_up[:, :F], 1, Fp), 0, Dp)
        up = _pad_to(_pad_to(gate_up[:, F:], 1, Fp), 0, Dp)
        gate_t, up_t = _tile(gate, 0, 1, grid), _tile(up, 0, 1, grid)
        # w_o rows are query heads (N H): each column's rows in the order of its QKV query heads,
        # zero rows for padded heads.
        w_o_DNH = _pad_to(np.asarray(lp["w_o"], np.float32), 1, Dp).T
        w_o = np.concatenate([_take_heads(w_o_DNH, layout.column_heads(c)[1], H) for c in range(grid.cols)], -1).T
        tiles = {
            "attn_norm": vec_d(lp["attn_norm"]),
            "w_qkv": _tile(w_qkv, 0, 1, grid),
            "w_o": _tile(w_o, 1, 0, grid),
            "mlp_norm": vec_d(lp["mlp_norm"]),
            "w_gate_up": np.concatenate([gate_t, up_t], axis=-1),
            "w_down": _tile(_pad_to(_pad_to(np.asarray(lp["w_down"], np.float32), 0, Fp), 1, Dp), 1, 0, grid),
        }
        if cfg.qkv_bias:
            b = _head_major(np.asarray(lp["b_qkv"], np.float32), layout)
            tiles["b_qkv"] = _tile(b, None, 0, grid)
        layers.append(tiles)
    def padded_vd(w):  # [V, D] -> [Vp, Dp]
        return _pad_to(_pad_to(np.asarray(w, np.float32), 0, Vp), 1, Dp)

    head = params.get("lm_head", params["embed"])
    out = {"layers": layers, "final_norm": vec_d(params["final_norm"]), "lm": _tile(padded_vd(head).T, 0, 1, grid)}
    if not cfg.tie_embeddings:  # a tied model reads its embedding rows out of the lm tile
        out["embed"] = _tile(padded_vd(params["embed"]), 1, 0, grid)
    return out
