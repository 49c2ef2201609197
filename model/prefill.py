"""Batched prefill on a prefill mesh: data-parallel over rows, tensor-parallel over columns.

The prefill mesh is an R×C grid run by the same executors as decode (mesh/executors.py), with
the division of work a dense accelerator cluster uses rather than the wafer's:

- rows split the batch: row r prefills sequences r*b .. r*b + b - 1 of the batch padded to R*b;
- columns split the model (Megatron-style): column c holds the query heads of its kc KV heads
  (with C >= 2K columns a KV group's query heads split over several columns, each with a copy of
  the KV head: `tensor_parallel_layout`), block c of the feed-forward width F and block c of the
  vocabulary. Each layer then needs two
  all-reduces over COL (after the output projection and after the down projection); the
  residual stream [b, T, D] is replicated over columns.

The column tiles are the decode tiles of a one-row grid (`tile_params` on `Grid(1, C)`):
KV heads zero-padded to a multiple of C with their query heads (from 2K columns on, split and
replicated instead: `tensor_parallel_layout`), F and V padded to multiples of C.
Zero heads attend to zero keys and add zero through zero rows of w_o, so padding changes nothing.

Prompts are right-padded to a common length; padding positions are computed (their rows are
discarded), never seen by a real query (causal mask, `kv_len` = prompt length) and their K and V
are zeroed before they reach the cache. Prompts longer than `chunk` are prefilled chunk by
chunk, each chunk extending the cache the previous ones wrote (blocked attention with
`q_start` = chunk offset). The LM head runs once per sequence, on its last prompt token.

Prefill layout of the KV cache (what the handoff reads), per layer, for K and for V:

    [R, C, b, kc, S, H]   entry [r, c, j, i, p] = sequence r*b + j, KV head c*kc + i, position p

(KV head `layout.kv_heads_by_column[c][i]` in general: c*kc + i below 2K columns; from 2K on, c //
rep, each head on rep neighbouring columns; the handoff reads one copy, `kv_head_sources`.)
KV heads >= K are zero padding; positions >= the prompt's length are zero; S is the prompt
length rounded up to whole chunks (or a longer cache length the caller asks for).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels.lm_head import mask_padded_vocab
from kernels.prefill_attention import blocked_causal_attention
from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import rope_cos_sin
from mesh.axes import COL, EMBED_SCOPE, LM_HEAD_SCOPE, ROW, layer_scope
from mesh.errors import WaferError
from mesh.executors import CoreMesh, Grid
from mesh.extent import ceil_div, round_up
from model.block import BlockShape, dense_ops, embed_from_vocab_shard, inv_freq_for, transformer_block
from model.cache import KVCache
from model.compile_cache import CompileCache
from model.config import ModelConfig
from model.generate import PROMPT_BUCKET, check_request
from model.sampling import Sampling, knob_rows, sample_vocab_shards
from model.wafer_layout import WaferLayout, tensor_parallel_layout, tile_params
from model.weights import Params, params_dtype

# Query and key block of the blocked attention, by platform, measured on SmolLM2 at 8 x 512 and
# 16 x 2048 (bench/RESULTS.md). CPU: 128 (64: 74 ms, 128: 71, 256: 133 per layer's attention);
# a GPU pays a host round trip per loop iteration, so fewer, larger blocks win there (H100, whole
# prefill: 128: 80 / 314 ms, 256: 45 / 227, 512: 52 / 207).
ATTENTION_BLOCK = {"cpu": 128, "gpu": 256}

# Longest chunk prefilled in one program. Longer prompts take several chunks; memory is linear
# either way (blocked attention), so this bounds activation memory, [b, chunk, F / C] at most.
PREFILL_CHUNK = 2048


def core_prefill_chunk(tiles, k_cache, v_cache, tokens_bT, lengths_b, start, x_last_bD, *,
                       layout: WaferLayout, block: int = 128):
    """One chunk of T prompt tokens for this core's b sequences and its column of the model.

    Args (all local to this core):
      tiles: the column's weight tiles (tile_params on a one-row grid, without the [R, C] axes).
      k_cache, v_cache: L arrays [b, kc, S, H]; positions < start already hold earlier chunks.
      tokens_bT: [b, T] token ids of positions start .. start + T - 1 (padding past a length).
      lengths_b: [b] prompt lengths (0 for batch padding).
      start: scalar int32, the chunk's first position.
      x_last_bD: [b, D] residual stream at each prompt's last token, if an earlier chunk held it.
      block: query and key block of the blocked attention (static).

    Returns:
      The extended caches and x_last_bD (updated for prompts ending in this chunk).
    """
    cfg = layout.config
    b, T = tokens_bT.shape
    kc, nc, H, D = layout.kc, layout.nc, cfg.head_dim, cfg.dim
    S = k_cache[0].shape[2]
    assert k_cache[0].shape == (b, kc, S, H), k_cache[0].shape
    assert x_last_bD.shape == (b, D), x_last_bD.shape

    with jax.named_scope(EMBED_SCOPE):
        x_bTD = embed_from_vocab_shard(tiles, tokens_bT, layout.v, lambda a: jax.lax.psum(a, COL))

    pos_T = start + jnp.arange(T, dtype=jnp.int32)
    cos_TH, sin_TH = rope_cos_sin(pos_T, inv_freq_for(cfg))
    real_bT = pos_T[None, :] < lengths_b[:, None]
    start_b = jnp.full((b,), start, jnp.int32)

    def attend(q, k, v, k_cache_i, v_cache_i):
        # Padding positions never reach the cache: the handoff ships clean zeros there.
        k = jnp.where(real_bT[..., None, None], k, 0.0).transpose(0, 2, 1, 3)
        v = jnp.where(real_bT[..., None, None], v, 0.0).transpose(0, 2, 1, 3)
        kcache = jax.lax.dynamic_update_slice(k_cache_i, k, (0, 0, start, 0))
        vcache = jax.lax.dynamic_update_slice(v_cache_i, v, (0, 0, start, 0))
        attn = blocked_causal_attention(q, kcache, vcache, start_b, lengths_b, q_block=block, kv_block=block)
        return attn, kcache, vcache

    # Columns hold whole heads and a block of F: QKV and gate|up are local, the output and down
    # projections are partial sums over the columns.
    shape = BlockShape((nc,), kc, H, layout.f)
    ops = dense_ops(cfg.rms_eps, attend, reduce_out=lambda y: jax.lax.psum(y, COL))
    new_k, new_v = [], []
    for i, t in enumerate(tiles["layers"]):
        with jax.named_scope(layer_scope(i)):
            x_bTD, kcache, vcache = transformer_block(t, x_bTD, cos_TH[None], sin_TH[None], k_cache[i], v_cache[i],
                                                      shape=shape, ops=ops)
        new_k.append(kcache)
        new_v.append(vcache)

    last_b = lengths_b - 1 - start
    in_chunk_b = (last_b >= 0) & (last_b < T)
    x_end_bD = jnp.take_along_axis(x_bTD, jnp.clip(last_b, 0, T - 1)[:, None, None], axis=1)[:, 0]
    x_last_bD = jnp.where(in_chunk_b[:, None], x_end_bD, x_last_bD)
    return tuple(new_k), tuple(new_v), x_last_bD


def core_prefill_head(tiles, x_last_bD, lengths_b, seed_b, temperature_b, top_k_b, top_p_b, *, layout: WaferLayout,
                      greedy: bool):
    """Final norm, this column's vocabulary block of the logits, and the first token, per sequence.

    seed_b, temperature_b, top_k_b, top_p_b: each of this row's sequences' sampling knobs [b]
    (ignored when `greedy`, else a sequence at temperature 0 takes the argmax).

    Returns the first tokens [b] (identical on every column) and this column's logits [b, v].
    """
    cfg = layout.config
    with jax.named_scope(LM_HEAD_SCOPE):
        h = rmsnorm_ref(x_last_bD, tiles["final_norm"], cfg.rms_eps)
        logits_bv = mask_padded_vocab(jnp.matmul(h, tiles["lm"], preferred_element_type=jnp.float32), cfg.vocab_size,
                                      COL)
    # The same keys as the single-device generator: fold the position of the token being chosen.
    first_b = sample_vocab_shards(logits_bv, cfg.vocab_size, lengths_b, seed_b, temperature_b, top_k_b, top_p_b,
                                  greedy)
    return first_b, logits_bv


@dataclasses.dataclass
class PrefillResult:
    """What a prefill produces, on the host except the cache (which stays on the prefill mesh)."""

    first_tokens: np.ndarray  # [B] int32: the first generated token of each prompt
    logits_BV: np.ndarray  # [B, V] float32 at each prompt's last token
    lengths: np.ndarray  # [B] prompt lengths
    k_cache: tuple[jax.Array, ...]  # L arrays [R, C, b, kc, S, H] (prefill layout, module docstring)
    v_cache: tuple[jax.Array, ...]
    config: ModelConfig
    grid: Grid
    seconds: float  # the compiled programs, from placed prompts to first tokens on the host
    compile_s: float

    def __post_init__(self):
        self._host: dict[str, list[np.ndarray]] = {}

    @property
    def max_len(self) -> int:  # S
        return self.k_cache[0].shape[4]

    def host_cache(self, which: str) -> list[np.ndarray]:
        """The whole cache `which` ("k" or "v") on the host as L arrays [B, K, S, H] (cached)."""
        if which not in self._host:
            cfg, B = self.config, len(self.lengths)
            R, C, b, kc, S, H = self.k_cache[0].shape
            arrays = self.k_cache if which == "k" else self.v_cache
            heads = [c * kc + i for c, i in tensor_parallel_layout(cfg, C).kv_head_sources]
            # [R, C, b, kc, S, H] -> [R, b, C, kc, S, H] -> [R b, C kc, S, H], then one copy of
            # each true KV head (padding and replicas dropped).
            self._host[which] = [np.asarray(a).transpose(0, 2, 1, 3, 4, 5).reshape(R * b, C * kc, S, H)
                                 [:B, heads] for a in arrays]
        return self._host[which]

    def sequence_kv(self, i: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Sequence i's cache as L arrays [K, S, H] for each of K and V, S = its prompt length."""
        n = int(self.lengths[i])
        return ([k[i, :, :n] for k in self.host_cache("k")], [v[i, :, :n] for v in self.host_cache("v")])

    def to_kvcache(self, max_len: int) -> KVCache:
        """The single-device cache [B, K, max_len, H] per layer (for decoding on one device)."""
        if max_len < int(self.lengths.max()):
            raise WaferError(f"a cache of {max_len} positions cannot hold a prompt of {int(self.lengths.max())}")
        S = min(max_len, self.max_len)

        def resize(a):
            out = np.zeros(a.shape[:2] + (max_len,) + a.shape[3:], a.dtype)
            out[:, :, :S] = a[:, :, :S]
            return jnp.asarray(out)
        return KVCache(tuple(map(resize, self.host_cache("k"))), tuple(map(resize, self.host_cache("v"))))


class Prefiller:
    """Prefills batches of prompts on a prefill mesh; compiled programs are cached per shape."""

    def __init__(self, params: Params, config: ModelConfig, core_mesh: CoreMesh, chunk: int = PREFILL_CHUNK,
                 attention_block: int | None = None):
        """`attention_block` defaults to the measured best for the platform (ATTENTION_BLOCK)."""
        if chunk < 1 or chunk % PROMPT_BUCKET:
            raise WaferError(f"prefill chunk must be a positive multiple of {PROMPT_BUCKET}, got {chunk}")
        if attention_block is None:
            attention_block = ATTENTION_BLOCK.get(jax.default_backend(), 128)
        if attention_block < 1:
            raise WaferError(f"attention block must be positive, got {attention_block}")
        self.attention_block = attention_block
        self.config, self.core_mesh, self.chunk = config, core_mesh, chunk
        self.dtype = params_dtype(params)  # of the caches and the residual stream
        grid = core_mesh.grid
        self.layout = tensor_parallel_layout(config, grid.cols)
        # Every row holds the same column tiles: [1, C, ...] -> [R, C, ...].
        tiles = jax.tree.map(lambda a: np.broadcast_to(a, (grid.rows,) + a.shape[1:]),
                             tile_params(params, self.layout))
        self.tiles = core_mesh.place(tiles)
        self.head_tiles = {k: self.tiles[k] for k in ("final_norm", "lm")}
        self._chunk_fn = jax.jit(core_mesh.run(functools.partial(core_prefill_chunk, layout=self.layout,
                                                                 block=attention_block)),
                                 donate_argnums=(1, 2, 6))
        self._head_fn = {greedy: jax.jit(core_mesh.run(functools.partial(core_prefill_head, layout=self.layout,
                                                                         greedy=greedy)))
                         for greedy in (True, False)}
        self._compiled = CompileCache()

    @property
    def compiles(self) -> int:
        """Programs compiled so far (by `prefill` or `precompile`)."""
        return self._compiled.compiles

    def _abstract(self, local_shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """What `core_mesh.zeros(local_shape)` would make, without making it (for compiling)."""
        shape = (self.core_mesh.grid.rows, self.core_mesh.grid.cols) + tuple(local_shape)
        sharding = None if self.core_mesh.mesh is None else NamedSharding(self.core_mesh.mesh, P(ROW, COL))
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)

    def _chunk_program(self, b: int, T: int, S: int, args=None) -> tuple[object, float]:
        """The compiled chunk program of b sequences per row, T-token chunks, S cache positions;
        `args` are its operands (their shapes), abstract ones when not given."""
        if args is None:
            cache = tuple(self._abstract((b, self.layout.kc, S, self.config.head_dim), self.dtype)
                          for _ in range(self.config.n_layers))
            args = (cache, cache, self._abstract((b, T), np.int32), self._abstract((b,), np.int32),
                    self._abstract((), np.int32), self._abstract((b, self.config.dim), self.dtype))
        return self._compiled.get(("chunk", b, T, S), self._chunk_fn, self.tiles, *args)

    def _head_program(self, b: int, greedy: bool, args=None) -> tuple[object, float]:
        """The compiled head (final norm, logits, first token) of b sequences per row."""
        if args is None:
            args = (self._abstract((b, self.config.dim), self.dtype), self._abstract((b,), np.int32),
                    *(self._abstract((b,), a.dtype) for a in knob_rows([Sampling()])))
        return self._compiled.get(("head", b, greedy), self._head_fn[greedy], self.head_tiles, *args)

    def precompile_shapes(self, max_prompt_len: int, batch_sizes: Sequence[int] = (1,)) -> list[tuple[int, int, int]]:
        """(b, T, S) of the chunk programs that prompts of 1 .. `max_prompt_len` tokens use, in
        batches of the given sizes (smallest batch first, then shortest prompt first), as `shapes`
        chooses them."""
        out = []
        for n in sorted(set(batch_sizes)):
            for length in range(PROMPT_BUCKET, round_up(max_prompt_len, PROMPT_BUCKET) + 1, PROMPT_BUCKET):
                b, T, _, S = self.shapes([[0] * length] * n)
                if (key := (b, T, S)) not in out:
                    out.append(key)
        return out

    def precompile(self, max_prompt_len: int, batch_sizes: Sequence[int] = (1,), go_on=None) -> int:
        """Compile ahead of time every program a batch of prompts of up to `max_prompt_len` tokens
        needs (the chunk program of each length bucket, the heads greedy and sampled), so that no
        later `prefill` of such a batch compiles. Thread-safe; `go_on()`, called before each
        program, may wait, and ends it early by returning False. Returns the number of programs
        compiled here."""
        before = self.compiles
        for b in sorted({self.shapes([[0]] * n)[0] for n in batch_sizes}):
            for greedy in (True, False):
                if go_on is not None and not go_on():
                    return self.compiles - before
                self._head_program(b, greedy)
        for b, T, S in self.precompile_shapes(max_prompt_len, batch_sizes):
            if go_on is not None and not go_on():
                break
            self._chunk_program(b, T, S)
        return self.compiles - before

    def _rows(self, a: np.ndarray) -> jax.Array:
        """Per-sequence values [R*b, ...] placed row by row, the same on every column: [R, C, b, ...]."""
        g = self.core_mesh.grid
        a = a.reshape((g.rows, -1) + a.shape[1:])
        return self.core_mesh.place(np.ascontiguousarray(np.broadcast_to(a[:, None], (g.rows, g.cols) + a.shape[1:])))

    def shapes(self, prompts: list[list[int]], cache_len: int | None = None) -> tuple[int, int, int, int]:
        """(b sequences per row, chunk length T, chunks, cache positions S) for a request."""
        longest = max(len(p) for p in prompts)
        total = round_up(longest, PROMPT_BUCKET)
        T = min(self.chunk, total)
        n_chunks = ceil_div(total, T)
        S = max(cache_len or 0, n_chunks * T)
        return ceil_div(len(prompts), self.core_mesh.grid.rows), T, n_chunks, S

    def prefill(self, prompts: list[list[int]], sampling: Sampling | Sequence[Sampling] = Sampling(),
                cache_len: int | None = None) -> PrefillResult:
        """Prefill a batch of prompts of any lengths; `cache_len` reserves room for decoding.

        `sampling` chooses the first tokens: one for every prompt, or one per prompt. A prompt's
        first token never depends on the other prompts of the batch or their Sampling.
        """
        cfg, g = self.config, self.core_mesh.grid
        check_request(cfg, prompts, 1)
        B = len(prompts)
        samplings = [sampling] * B if isinstance(sampling, Sampling) else list(sampling)
        if len(samplings) != B:
            raise WaferError(f"{len(samplings)} samplings for {B} prompts")
        greedy = all(s.greedy for s in samplings)
        b, T, n_chunks, S = self.shapes(prompts, cache_len)
        tokens = np.zeros((g.rows * b, n_chunks * T), np.int32)
        lengths = np.zeros(g.rows * b, np.int32)  # batch padding: length 0, attends to nothing
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        cache_shape = (b, self.layout.kc, S, cfg.head_dim)
        L = cfg.n_layers

        k_cache = tuple(self.core_mesh.zeros(cache_shape, self.dtype) for _ in range(L))
        v_cache = tuple(self.core_mesh.zeros(cache_shape, self.dtype) for _ in range(L))
        x_last = self.core_mesh.zeros((b, cfg.dim), self.dtype)
        lengths_d = self._rows(lengths)
        chunk_args = [self._rows(tokens[:, i * T: (i + 1) * T]) for i in range(n_chunks)]
        starts = [self.core_mesh.broadcast(np.int32(i * T)) for i in range(n_chunks)]
        # Batch padding rows choose greedily (their tokens are dropped).
        knobs = [self._rows(a) for a in knob_rows(samplings + [Sampling()] * (g.rows * b - B))]
        chunk_fn, compile_s = self._chunk_program(b, T, S, (k_cache, v_cache, chunk_args[0], lengths_d, starts[0],
                                                            x_last))
        head_fn, c = self._head_program(b, greedy, (x_last, lengths_d, *knobs))
        compile_s += c

        t0 = time.perf_counter()
        for tokens_d, start_d in zip(chunk_args, starts):
            k_cache, v_cache, x_last = chunk_fn(self.tiles, k_cache, v_cache, tokens_d, lengths_d, start_d, x_last)
        first, logits = head_fn(self.head_tiles, x_last, lengths_d, *knobs)
        first = np.asarray(first)  # [R, C, b]: every column holds the same tokens
        seconds = time.perf_counter() - t0
        logits = np.asarray(logits)  # [R, C, b, v]
        logits_BV = logits.transpose(0, 2, 1, 3).reshape(g.rows * b, -1)[:B, : cfg.vocab_size]
        return PrefillResult(first[:, 0].reshape(-1)[:B].astype(np.int32), logits_BV, lengths[:B], k_cache, v_cache,
                             cfg, g, seconds, compile_s)
