"""How a model's weights and KV cache are cut into per-core tiles on an R×C grid.

Every tensor a core holds is stored globally as [R, C, *local] (see mesh/executors.py) and
described once, by a `TensorSpec` of `WaferLayout.tensor_specs` (mesh/tensor_spec.py): its
logical axes and which of them lie along ROW and COL. The tiling (`tile_params`), the SRAM plan,
the profiler's abstract operands and its padding map all read those specs. The layout
alternates which axis a GEMV reduces over, so each output already lies where the next
GEMV wants its input:

  x        [B, D_row]             residual stream: D split over rows, replicated over columns
  w_qkv    [D_row, QKV_col]        reduce over ROW -> q, k, v of column c's heads on every row
  KV cache [B, K_col, S_row, hc]   KV heads over columns, positions over rows (cyclic: p % R)
  w_o      [NH_col, D_row]         reduce over COL -> residual update [D_row]
  w_gate_up[D_row, 2F_col]         reduce over ROW -> [2F_col]
  w_down   [F_col, D_row]          reduce over COL -> [D_row]
  lm       [D_row, V_col]          reduce over ROW -> logits [V_col]; a tied model's embedding too
  embed    [V_col, D_row]          an untied model's embedding table (one column holds each token)

QKV is column c's q | k | v (its nc query heads, then its kc KV heads' k and v, hc wide each:
hc = H with whole heads, a slice of H in the full-grid layout below), NH
its nc query heads, 2F its block of the gate projection followed by the same block of the up
projection. These are the logical axes of the specs (`TensorSpec.axes`).

How whole heads lie over the C columns (mode HEADS; K KV heads, G = N/K query heads each):

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

The full-grid layout (mode FULL; AUTO picks it when it holds fewer bytes per core). Aligning
whole heads with columns leaves every column past K*rep holding zeros (Llama3-8B on 360 columns:
32 hold heads). Instead the C columns are cut into `segments` = C // seg head segments of seg
contiguous columns (the C % seg columns past the last one hold no head: fewer than one segment).
The heads lie over the segments exactly as whole heads lie over columns above (kc, gc, rep
computed with `segments` in place of C), and every column of a segment holds the segment's heads,
each cut to one slice of the head dimension: column j of a segment holds hc = 2*ceil(H/2 / seg)
dims of each of its nc query heads and kc KV heads (`column_dims`). Slice j holds rotary pairs
j*hc/2 .. j*hc/2 + hc/2 - 1 (RoPE rotates dim i with dim i + H/2, HF's half split), laid out as a
half-split head of its own, so RoPE stays local (with those pairs' frequencies). Every tensor
that touches a head's dims follows the same order: the q, k and v columns of w_qkv (and b_qkv),
the KV cache's last axis, the rows of w_o.

  QKV      [D_row, QKV_col]   column c: q | k | v of its segment's heads, its hc dims of each
  KV cache [B, K_col, S_row, hc]
  w_o      [NH_col, D_row]    rows: its heads' hc dims (those of its slice of v)

Scores q·kᵀ become partial dot products per core, summed by an all-reduce SEGMENTED to the seg
columns of each segment (kernels/allreduce.py, every schedule); the softmax then runs per head as
before (max and sum over ROW), p·V gives each column its hc dims of the output, which meet its
rows of w_o, and the COL reduction after w_o sums segments and slices alike. seg is the m > 1
(any m <= C, not only divisors) with the fewest attention bytes per core (w_qkv, w_o and the KV
cache at batch 1), then the fewest idle columns; AUTO also weighs m = 1 (whole heads) and keeps
it on a tie. WaferLLM's decode configs (one head, head_dim = dim) are one segment of all C columns.

GQA in the full-grid layout: KV head h's slice j lies on column j of each segment that holds h's
query heads. With more segments than KV heads (segments > K) a KV group's query heads split over
rep segments and h's slice j is replicated on column j of each of them, exactly as whole KV heads
are replicated over columns above. Cost of that replication, against one copy: rep-fold bytes of
the k and v projection weights and of the KV cache over the wafer (per core: 2*kc*hc columns of
w_qkv and kc*(s+1)*hc cache entries, the same on every core), rep-fold FLOPs of the k and v
projections and of the cache writes; no message is added for it (each segment attends its own
query heads against its own copy). What the full-grid layout itself adds is one segmented
all-reduce per layer: B*nc*(s+1) float32 partial scores per core, over seg cores (2*(seg-1)
messages per segment in a chain, seg - 1 per core in a ring).

The split is automatic: a core's w_qkv, w_o, KV cache, attention FLOPs and messages are never
larger than with whole groups (gc <= G, kc = 1 either way once C >= K), so it never loses on a
wafer, where one core's time is the grid's. `split_groups=False` keeps whole groups for any C
and no head-dim split. The prefill mesh's `tensor_parallel_layout` is mode HEADS: whole heads,
KV groups split over columns once C >= 2K (C // K > 1), as above.

Where the padding lies (the useful fraction, `SramPlan.useful_fraction`: non-padding bytes /
placed bytes). Llama3-8B, bf16, context 4096, a middle stage on 360x360 (seg 45, hc 4): 0.869;
every tensor with a D axis is capped by D's rounding over the rows (4096 / (12 x 360) = 0.948),
the FFN (2/3 of the bytes) stands at 0.944, and w_qkv, w_o and the KV cache at 0.67, 0.67 and
0.62: 64 rotary pairs over 45 columns round to 2 per column (90 pairs' room), and the cache has
its scratch slot. On 420x420 (seg 105, 2 KV groups per segment, hc 2: 64 pairs over 105
columns): 0.84, attention 0.59. Whole rotary pairs cost each KV group at least one 12-dim column
slice (4 query heads, k and v, 2 dims each) per pair, and 8 x 64 group-pairs over 360 or 420
columns round to 2 per column: 24 dims of w_qkv per column for 6144 / C needed (17.1, 14.6). No
choice of seg does better with equal tiles per core (segments of 32 or 64 columns fill every
slice but leave columns idle: the same bytes per core). More replication packs w_qkv and w_o
better but holds more bytes per core (420x420, 32 segments of 13 columns, one query head each, KV
4x: 38,888 B against 36,268; it reads 0.94 only because each replica counts as useful). Even
with every width rounded only to whole dims (fused q|k|v at ceil(6144 / C), no pairs, no head
grouping) a stage holds 0.932 on 360x360 and 0.949 on 420x420: F over the columns, the cache's
positions over the rows and its scratch slot round too.

Dimensions that do not divide the grid are zero-padded: D to a multiple of R, KV heads and query
heads as above, head dims to whole rotary pairs per slice, F and V to multiples of C, S to a
multiple of R. Zero rows and columns contribute
exact zeros to every sum (a zero query head's attention output meets zero rows of w_o), norms
divide by the true D, and padded vocabulary entries are masked out of the argmax, so padding
never changes a result.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Iterator

import einops
import numpy as np

from mesh.axes import COL, ROW
from mesh.executors import Grid
from mesh.extent import ceil_div
from mesh.tensor_spec import Kind, TensorSpec
from model.config import ModelConfig
from model.weights import Params, lm_head_weight

# Keys of the vocabulary tiles in `tile_params`' dict. The LM head tile is the output projection
# and, when the embedding is tied, the embedding table too (token t is its column t); an untied
# model has an embedding tile of its own.
LM_HEAD_TILE = "lm"
EMBED_TILE = "embed"
LAYERS = "layers"  # key of the per-layer tiles; a layer tensor's spec is named f"layers.{i}.{key}"


class LayoutMode(enum.Enum):
    """How attention heads lie over the columns (module docstring)."""

    AUTO = "auto"  # the one of the two with the fewest bytes per core (ties: heads)
    HEADS = "heads"  # whole heads per column (seg = 1)
    FULL = "full"  # each head's dimension split over a segment of seg > 1 columns


@dataclasses.dataclass(frozen=True)
class WaferLayout:
    """Per-core extents of every dimension for one model on one grid."""

    config: ModelConfig
    grid: Grid
    max_len: int  # S: cache positions per sequence (before padding to the grid)
    split_groups: bool = True  # with more head columns than KV heads, split groups and replicate KV (above)
    mode: LayoutMode = LayoutMode.AUTO

    def __post_init__(self):
        if not self.split_groups and self.mode is LayoutMode.FULL:
            raise ValueError("a layout of whole KV groups per column (split_groups=False) splits no head dimension")

    @property
    def d(self) -> int:  # local D per row
        return ceil_div(self.config.dim, self.grid.rows)

    @functools.cached_property
    def seg(self) -> int:
        """Columns per head segment: 1 (whole heads per column) or the m > 1 whose layout holds the
        fewest attention bytes per core, then leaves the fewest columns idle (FULL; AUTO compares
        it with 1)."""
        C = self.grid.cols
        if self.mode is LayoutMode.HEADS or not self.split_groups or C == 1:
            return 1
        candidates = range(1 if self.mode is LayoutMode.AUTO else 2, C + 1)
        return min(candidates, key=lambda m: (self._attention_elements(m), self._idle_columns(m), m))

    def _idle_columns(self, seg: int) -> int:
        """Columns without a real head: past the last whole segment, or in segments left without one."""
        cols = self.grid.cols // seg
        kc, gc, rep = self._heads(cols)
        used = min(cols, ceil_div(self.config.n_kv_heads, kc) * rep)
        return self.grid.cols - used * seg

    def _attention_elements(self, seg: int) -> int:
        """Per-core elements of one layer's attention tensors (QKV, O, K and V cache at batch 1)
        with head segments of `seg` columns: what the choice of `seg` minimizes."""
        kc, gc, _ = self._heads(self.grid.cols // seg)
        hc = self._hc(seg)
        return (self.d * (2 * kc * gc + 2 * kc) + 2 * kc * (self.s + 1)) * hc

    def _hc(self, seg: int) -> int:
        H = self.config.head_dim
        # Whole rotary pairs per slice (RoPE rotates dim i with i + H/2; both must lie on one core).
        return H if seg == 1 else 2 * ceil_div(ceil_div(H, 2), seg)

    def _heads(self, cols: int) -> tuple[int, int, int]:
        """(kc, gc, rep) of whole heads over `cols` head columns (module docstring)."""
        K, G = self.config.n_kv_heads, self.config.q_per_kv
        if self.split_groups and cols > K:
            gc = ceil_div(G, min(G, cols // K))
            return 1, gc, ceil_div(G, gc)
        return ceil_div(K, cols), G, 1

    @property
    def segments(self) -> int:  # head segments: runs of seg columns holding the same heads
        return self.grid.cols // self.seg  # the C % seg columns past the last one hold no head

    @property
    def hc(self) -> int:  # local head dimension: H, or one slice of it
        return self._hc(self.seg)

    @property
    def kc(self) -> int:  # KV heads per column
        return self._heads(self.segments)[0]

    @property
    def gc(self) -> int:  # query heads per column of each of its KV heads
        return self._heads(self.segments)[1]

    @property
    def rep(self) -> int:  # head segments per KV head (1: whole groups)
        return self._heads(self.segments)[2]

    @property
    def nc(self) -> int:  # query heads per column
        return self.kc * self.gc

    def column_heads(self, c: int) -> tuple[list[int | None], list[int | None]]:
        """Column c's KV heads (kc of them) and query heads (nc, grouped by KV head); None: padding.

        The one head-to-column map: the tiling, the decode cache layout (`kv_heads_by_column`)
        and the padding map all read it. Every column of a head segment holds the same heads."""
        K, G = self.config.n_kv_heads, self.config.q_per_kv
        g = c // self.seg  # the column's head segment
        kv, q = [], []
        for a in range(self.kc):
            h = (g // self.rep) * self.kc + a
            first = (g % self.rep) * self.gc
            real = h < K and g < self.segments
            kv.append(h if real else None)
            q += [h * G + first + i if real and first + i < G else None for i in range(self.gc)]
        return kv, q

    def column_dims(self, c: int) -> tuple[int | None, ...]:
        """The head dimensions (of every head it holds) column c holds, in local order; None: padding.

        Slice j = c % seg holds rotary pairs j*p .. j*p + p - 1 (p = hc/2) as a half-split head of
        its own: [their first halves | their second halves], so RoPE rotates it locally with the
        pairs' frequencies (`rope_pairs`). With seg 1 this is 0 .. H-1 in order."""
        half, p = self.config.head_dim // 2, self.hc // 2
        if c >= self.segments * self.seg:  # past the last segment: no head at all
            return (None,) * self.hc
        pairs = [i if i < half else None for i in range((c % self.seg) * p, (c % self.seg + 1) * p)]
        return tuple(pairs) + tuple(None if i is None else half + i for i in pairs)

    def rope_pairs(self) -> np.ndarray:
        """[seg, hc/2] the rotary pair index of each slice's local pair (-1: padding)."""
        half, p = self.config.head_dim // 2, self.hc // 2
        idx = np.arange(self.seg * p).reshape(self.seg, p)
        return np.where(idx < half, idx, -1)

    @property
    def kv_head_sources(self) -> tuple[tuple[int, int], ...]:
        """Per true KV head h, (column, slot) of its first copy: where a handoff reads it (a
        replicated head is read once; the other copies hold the same values)."""
        first: dict[int, tuple[int, int]] = {}
        for c, heads in enumerate(self.kv_heads_by_column):
            for i, h in enumerate(heads):
                if h is not None:
                    first.setdefault(h, (c, i))
        return tuple(first[h] for h in range(self.config.n_kv_heads))

    @property
    def kv_heads_by_column(self) -> tuple[tuple[int | None, ...], ...]:
        """Per column, its kc KV heads (None: padding): the map a decode cache layout needs."""
        return tuple(tuple(self.column_heads(c)[0]) for c in range(self.grid.cols))

    @property
    def q_heads_by_column(self) -> tuple[tuple[int | None, ...], ...]:
        """Per column, its nc query heads grouped by KV head (None: padding)."""
        return tuple(tuple(self.column_heads(c)[1]) for c in range(self.grid.cols))

    @property
    def dims_by_column(self) -> tuple[tuple[int | None, ...], ...]:
        """Per column, the head dimensions it holds (`column_dims`)."""
        return tuple(self.column_dims(c) for c in range(self.grid.cols))

    @property
    def f(self) -> int:  # local F per column
        return ceil_div(self.config.ffn_dim, self.grid.cols)

    @property
    def v(self) -> int:  # local V per column
        return ceil_div(self.config.vocab_size, self.grid.cols)

    @property
    def s(self) -> int:  # cache positions per row
        return ceil_div(self.max_len, self.grid.rows)

    @property
    def s_slots(self) -> int:
        """Cache slots per row: s positions plus one scratch slot. Every row writes the new K and
        V each step; rows that do not own the position write into the scratch slot, which is
        never attended to. A plain write then never reads the cache first, which kept XLA
        from updating the cache in place (it copied every layer's cache every step)."""
        return self.s + 1

    @property
    def qkv_width(self) -> int:  # local width of the fused QKV output: q | k | v of column c
        return (self.nc + 2 * self.kc) * self.hc

    @property
    def embedding_tile(self) -> str:
        """The tile the embedding rows are read from: EMBED_TILE [V_col, D_row], or for a tied
        model LM_HEAD_TILE [D_row, V_col] (token t is its column t)."""
        return LM_HEAD_TILE if self.config.tie_embeddings else EMBED_TILE

    def weight_specs(self) -> list[TensorSpec]:
        """Every weight tile a core holds (`tile_params` tiles exactly these)."""
        return [s for s in self.tensor_specs(batch=1) if s.kind is Kind.WEIGHT]

    def tensor_specs(self, batch: int, dtype: str = "float32") -> list[TensorSpec]:
        """Every tensor a core holds during decode: the single description that placement, the
        SRAM planner and the profiler all read.

        `dtype` is the storage of the weights, the KV cache and the activations between kernels
        (x, qkv, gate_up); the attention scores and the logits stay float32 (softmax and sampling
        read them), as the decode step computes them.
        """
        cfg, H, W, KV, BUF = self.config, self.hc, Kind.WEIGHT, Kind.KV, Kind.BUFFER
        d_row, qkv_col = ("D", ROW), ("QKV", COL)
        specs = []
        for i in range(cfg.n_layers):
            p = f"{LAYERS}.{i}."
            specs += [TensorSpec(p + "attn_norm", W, (self.d,), (d_row,)),
                      TensorSpec(p + "w_qkv", W, (self.d, self.qkv_width), (d_row, qkv_col))]
            if cfg.qkv_bias:
                specs.append(TensorSpec(p + "b_qkv", W, (self.qkv_width,), (qkv_col,)))
            cache = ((batch, self.kc, self.s_slots, H), (("B", None), ("K", COL), ("S", ROW), ("H", None)))
            specs += [TensorSpec(p + "w_o", W, (self.nc * H, self.d), (("NH", COL), d_row)),
                      TensorSpec(p + "mlp_norm", W, (self.d,), (d_row,)),
                      TensorSpec(p + "w_gate_up", W, (self.d, 2 * self.f), (d_row, ("2F", COL))),
                      TensorSpec(p + "w_down", W, (self.f, self.d), (("F", COL), d_row)),
                      # S over rows cyclically (position p on row p % R), plus the scratch slot.
                      TensorSpec(p + "k_cache", KV, *cache), TensorSpec(p + "v_cache", KV, *cache)]
        specs += [TensorSpec("final_norm", W, (self.d,), (d_row,)),
                  TensorSpec(LM_HEAD_TILE, W, (self.d, self.v), (d_row, ("V", COL)))]
        if not cfg.tie_embeddings:
            specs.append(TensorSpec(EMBED_TILE, W, (self.v, self.d), (("V", COL), d_row)))
        # Live activations of one step (the largest set alive at once, reused layer to layer).
        b = ("B", None)
        specs += [TensorSpec("x", BUF, (batch, self.d), (b, d_row)),
                  TensorSpec("qkv", BUF, (batch, self.qkv_width), (b, qkv_col)),
                  TensorSpec("scores", BUF, (batch, self.nc, self.s_slots), (b, ("N", COL), ("S", ROW))),
                  TensorSpec("gate_up", BUF, (batch, 2 * self.f), (b, ("2F", COL))),
                  TensorSpec("logits", BUF, (batch, self.v), (b, ("V", COL)))]
        stays_f32 = {"scores", "logits"}
        return [s if s.name in stays_f32 else dataclasses.replace(s, dtype=dtype) for s in specs]

    def real_elements(self, spec: TensorSpec) -> np.ndarray:
        """[R, C]: elements of the spec's tile on each core that are not padding (a replicated KV
        head counts on each of its columns; every core's cache positions < max_len count, the
        scratch slot does not; head dimensions count where `column_dims` holds a real one)."""
        cfg, R, C = self.config, self.grid.rows, self.grid.cols
        r, c = np.arange(R)[:, None], np.arange(C)[None, :]
        real = lambda total, per, idx: np.clip(total - idx * per, 0, per)
        q = np.array([sum(h is not None for h in heads) for heads in self.q_heads_by_column])[None, :]
        k = np.array([sum(h is not None for h in heads) for heads in self.kv_heads_by_column])[None, :]
        positions = np.array([sum(1 for j in range(self.s) if j * R + i < self.max_len) for i in range(R)])[:, None]
        h = np.array([sum(i is not None for i in dims) for dims in self.dims_by_column])[None, :]
        extents = {"D": real(cfg.dim, self.d, r), "F": real(cfg.ffn_dim, self.f, c),
                   "2F": 2 * real(cfg.ffn_dim, self.f, c), "V": real(cfg.vocab_size, self.v, c),
                   "QKV": (q + 2 * k) * h, "NH": q * h, "N": q, "K": k, "S": positions, "H": h}
        out = np.ones((R, C), dtype=np.int64)
        for n, (dim, mesh_axis) in zip(spec.local_shape, spec.axes):
            # H is not split over a mesh axis of its own (K is, over COL), but its slice differs by column.
            out = out * (extents[dim] if mesh_axis is not None or dim == "H" else n)
        return out

    def useful_bytes(self, specs: list[TensorSpec]) -> int:
        """Bytes of `specs` over the whole grid that are not padding (`real_elements`; buffers too:
        the residual buffer's rounding of D, the logits buffer's of V are padding like a weight's)."""
        total, cache = 0, {}
        for s in specs:
            key = (s.local_shape, s.axes)
            if key not in cache:
                cache[key] = int(self.real_elements(s).sum())
            total += cache[key] * np.dtype(s.dtype).itemsize
        return total


def tensor_parallel_layout(config: ModelConfig, cols: int) -> WaferLayout:
    """The prefill mesh's tensor-parallel split over `cols` columns (the weight tiles of a one-row
    grid; extents kc, nc, f, v).

    Whole heads per column (mode HEADS, no head-dim split: prefill's attention is a local
    matmul per column). With C >= 2K columns a KV group's query heads split over rep = ceil(G /
    gc) columns, each holding a copy of the KV head and computing its k and v (the decode
    layout's replication), so no column holds zero attention tiles while another holds whole
    groups: SmolLM2 (K = 3, G = 3) on 6 columns holds 2 query heads per column, not 3 on half of
    them. Column c's cache holds KV heads `kv_heads_by_column[c]` (c*kc + i below 2K columns, c //
    rep above); the handoff ships one copy of each (`kv_head_sources`). The prefill cache is not
    this layout's: its one cache position is a placeholder."""
    return WaferLayout(config, Grid(1, cols), max_len=1, mode=LayoutMode.HEADS)


def _pad_to(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return np.pad(a, pad)


def _take_heads(w: np.ndarray, heads: tuple[int | None, ...], H: int, dims: tuple[int | None, ...]) -> np.ndarray:
    """Dimensions `dims` of heads `heads` (blocks of H along the last axis of `w`), head by head
    in the order given; None (a head or a dimension): zeros."""
    idx = np.array([-1 if h is None or i is None else h * H + i for h in heads for i in dims], np.int64)
    return np.where(idx >= 0, w[..., np.maximum(idx, 0)], 0).astype(w.dtype)


def _head_major(w: np.ndarray, layout: WaferLayout) -> np.ndarray:
    """Reorder a fused QKV output axis (last) from q|k|v into column-major groups: for each
    column c, [its query heads | its k heads | its v heads] (layout.column_heads, padding zero;
    a replicated KV head's k and v appear on each of its columns), each head cut to the column's
    head dimensions (layout.column_dims)."""
    cfg = layout.config
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = w[..., : N * H], w[..., N * H: (N + K) * H], w[..., (N + K) * H:]
    cols = []
    for kv_heads, q_heads, dims in zip(layout.kv_heads_by_column, layout.q_heads_by_column, layout.dims_by_column):
        cols += [_take_heads(q, q_heads, H, dims), _take_heads(k, kv_heads, H, dims), _take_heads(v, kv_heads, H, dims)]
    return np.concatenate(cols, axis=-1)


def _padded_weights(params: Params, layout: WaferLayout) -> Iterator[tuple[str, np.ndarray]]:
    """(spec name, padded global array) of every weight, arranged so that the spec's blocks are
    the tiles: heads in column-major groups, each column's gate block beside its up block."""
    cfg, grid = layout.config, layout.grid
    Dp, Fp, Vp = layout.d * grid.rows, layout.f * grid.cols, layout.v * grid.cols
    # On the host in the params' own dtype: a 16-bit model's tiles are 16-bit.
    host = lambda w: np.asarray(w)
    for i, lp in enumerate(params["layers"]):
        p = f"{LAYERS}.{i}."
        yield p + "attn_norm", _pad_to(host(lp["attn_norm"]), 0, Dp)
        yield p + "w_qkv", _head_major(_pad_to(host(lp["w_qkv"]), 0, Dp), layout)
        if cfg.qkv_bias:
            yield p + "b_qkv", _head_major(host(lp["b_qkv"]), layout)
        # w_o rows are query heads (N H): each column's rows in the order of its QKV query heads
        # and head dimensions (those of its slice of v), zero rows for padding.
        w_o_DNH = _pad_to(host(lp["w_o"]), 1, Dp).T
        yield p + "w_o", np.concatenate([_take_heads(w_o_DNH, q, cfg.head_dim, dims) for q, dims in
                                         zip(layout.q_heads_by_column, layout.dims_by_column)], -1).T
        yield p + "mlp_norm", _pad_to(host(lp["mlp_norm"]), 0, Dp)
        gate_up = host(lp["w_gate_up"])
        F = cfg.ffn_dim
        gate, up = (_pad_to(_pad_to(a, 1, Fp), 0, Dp) for a in (gate_up[:, :F], gate_up[:, F:]))
        yield p + "w_gate_up", einops.rearrange(np.stack([gate, up]), "two D (C f) -> D (C two f)", C=grid.cols)
        yield p + "w_down", _pad_to(_pad_to(host(lp["w_down"]), 0, Fp), 1, Dp)
    yield "final_norm", _pad_to(host(params["final_norm"]), 0, Dp)
    padded_VD = lambda w: _pad_to(_pad_to(host(w), 0, Vp), 1, Dp)
    yield LM_HEAD_TILE, padded_VD(lm_head_weight(params)).T
    if not cfg.tie_embeddings:  # a tied model reads its embedding rows out of the LM head tile
        yield EMBED_TILE, padded_VD(params["embed"])


def nest_by_name(flat: dict, n_layers: int) -> dict:
    """{spec name: value} -> the tiles pytree `core_decode_step` reads: layer tensors under
    LAYERS (a list of L dicts keyed by "attn_norm", ...), the others by their names."""
    out: dict = {LAYERS: [{} for _ in range(n_layers)]}
    for name, value in flat.items():
        parts = name.split(".")
        if parts[0] == LAYERS:
            out[LAYERS][int(parts[1])][parts[2]] = value
        else:
            out[name] = value
    return out


def tile_params(params: Params, layout: WaferLayout) -> dict:
    """Per-core tiles [R, C, *local] of every weight, from single-device params: the padded
    global arrays cut by their specs (`WaferLayout.weight_specs`)."""
    specs = {s.name: s for s in layout.weight_specs()}
    tiles = {}
    for name, a in _padded_weights(params, layout):
        tiles[name] = specs[name].tile(a, layout.grid)
    if set(tiles) != set(specs):
        raise ValueError(f"tile_params: tiles {sorted(set(tiles) ^ set(specs))} differ from the layout's specs")
    return nest_by_name(tiles, layout.config.n_layers)
