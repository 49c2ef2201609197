"""Wafer decode: the transformer decode step as the program of one core, over an R×C core mesh.

Each core holds only its own weight tiles and its slice of the KV cache (see wafer_layout.py for
what lies where) and talks to the rest of the mesh only through collectives along ROW and COL.
The decode batch has B slots with independent positions: a prefilled sequence is inserted into
a free slot (its cache moved into the decode layout), decodes alongside the others, and is
evicted when finished.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kernels.allreduce import Schedule, allreduce
from kernels.attention import decode_attention_mesh
from kernels.lm_head import mask_padded_vocab, sample_mesh
from kernels.mesh_gemv import mesh_gemv
from kernels.rmsnorm import rmsnorm_gemv_mesh
from kernels.rope import apply_rope_ref, rope_cos_sin
from kvcache.cache import write_kv
from kvcache.layout import DecodeKVLayout
from mesh.axes import COL, ROW
from mesh.errors import WaferError
from mesh.executors import CoreMesh
from mesh.planner import plan_sram
from mesh.wafer import WaferSpec, emulated_spec
from model.config import ModelConfig
from model.forward import inv_freq_for
from model.generate import (CACHE_BUCKET, PROMPT_BUCKET, GenerationResult, Generator, Sampling, round_up,
                            check_request, decode_loop)
from model.wafer_layout import WaferLayout, tile_params
from model.weights import Params


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """Static choices of the per-core program."""

    schedule: Schedule = Schedule.PSUM
    groups: int | None = None  # K-tree groups per axis (None: ~sqrt of the axis length)
    greedy: bool = True


def core_decode_step(tiles, k_cache, v_cache, tokens_B, pos_B, active_B, seed, temperature, top_k, top_p,
                     *, layout: WaferLayout, opts: MeshOptions):
    """One decode step of one core.

    Args (all local to this core):
      tiles: this core's weight tiles (wafer_layout.tile_params, without the [R, C] axes).
      k_cache, v_cache: L arrays [B, kc, s+1, H]: this core's KV heads and cache positions.
      tokens_B: [B] the tokens to feed (the same on every core).
      pos_B: [B] their positions; active_B: [B] bool, which slots hold a live sequence.
      seed, temperature, top_k, top_p: sampling knobs (scalars, the same on every core).

    Returns:
      next tokens [B], next positions [B] and the updated cache, identical on every core, and
      this column's logits [B, v] (for checks against the single-device decoder).
    """
    cfg: ModelConfig = layout.config
    R = layout.grid.rows
    B = tokens_B.shape[0]
    kc, gc, H, d = layout.kc, layout.gc, cfg.head_dim, layout.d
    sched, groups = opts.schedule, opts.groups
    r = jax.lax.axis_index(ROW)
    c = jax.lax.axis_index(COL)
    assert tiles["lm"].shape == (d, layout.v), tiles["lm"].shape
    assert k_cache[0].shape == (B, kc, layout.s_slots, H), k_cache[0].shape

    with jax.named_scope("embed"):
        local_tok = tokens_B - c * layout.v
        in_block = (local_tok >= 0) & (local_tok < layout.v)
        safe = jnp.clip(local_tok, 0, layout.v - 1)
        rows_Bd = tiles["embed"][safe] if "embed" in tiles else tiles["lm"][:, safe].T
        # Exactly one column holds each token's row: the sum over COL is exact.
        x_Bd = allreduce(jnp.where(in_block[:, None], rows_Bd, 0.0), COL, sched, groups)

    cos_BH, sin_BH = rope_cos_sin(pos_B, inv_freq_for(cfg))
    # Cache positions are dealt cyclically over rows: position p lives on row p % R at p // R.
    mine_B = (pos_B % R == r) & active_B
    slot_B = jnp.where(mine_B, pos_B // R, layout.s)  # layout.s: the scratch slot
    j = jnp.arange(layout.s_slots)[None, :]
    visible_Bs = (j < layout.s) & (j * R + r <= pos_B[:, None])
    new_k, new_v = [], []
    for i, t in enumerate(tiles["layers"]):
        with jax.named_scope(f"layer{i}"):
            with jax.named_scope("attention"):
                qkv = rmsnorm_gemv_mesh(x_Bd, t["attn_norm"], t["w_qkv"], cfg.rms_eps, cfg.dim, ROW, sched, groups)
                if "b_qkv" in t:
                    qkv = qkv + t["b_qkv"]
                nq = layout.nc * H
                q = apply_rope_ref(qkv[:, :nq].reshape(B, kc, gc, H), cos_BH[:, None, None], sin_BH[:, None, None])
                k = apply_rope_ref(qkv[:, nq: nq + kc * H].reshape(B, kc, H), cos_BH[:, None], sin_BH[:, None])
                v = qkv[:, nq + kc * H:].reshape(B, kc, H)
                kcache = write_kv(k_cache[i], k[:, :, None], slot_B)
                vcache = write_kv(v_cache[i], v[:, :, None], slot_B)
                attn = decode_attention_mesh(q, kcache, vcache, visible_Bs, ROW, sched, groups)
                x_Bd = x_Bd + mesh_gemv(attn.reshape(B, nq), t["w_o"], COL, sched, groups)
            with jax.named_scope("mlp"):
                gate_up = rmsnorm_gemv_mesh(x_Bd, t["mlp_norm"], t["w_gate_up"], cfg.rms_eps, cfg.dim, ROW, sched,
                                            groups)
                f = layout.f
                x_Bd = x_Bd + mesh_gemv(jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:], t["w_down"], COL, sched,
                                        groups)
        new_k.append(kcache)
        new_v.append(vcache)

    with jax.named_scope("lm_head"):
        logits_Bv = rmsnorm_gemv_mesh(x_Bd, tiles["final_norm"], tiles["lm"], cfg.rms_eps, cfg.dim, ROW, sched,
                                      groups)
        logits_Bv = mask_padded_vocab(logits_Bv, cfg.vocab_size, COL)
    # The same keys as the single-device decoder: fold the position of the token being chosen.
    keys_B = jax.vmap(lambda p: jax.random.fold_in(jax.random.key(seed), p))(pos_B + 1)
    next_B = sample_mesh(logits_Bv, COL, cfg.vocab_size, keys_B, temperature, top_k, top_p, opts.greedy)
    next_B = jnp.where(active_B, next_B, tokens_B)
    return next_B, pos_B + active_B.astype(pos_B.dtype), tuple(new_k), tuple(new_v), logits_Bv


def cache_to_decode_layout(k_KSH: np.ndarray, layout: WaferLayout) -> np.ndarray:
    """One sequence's cache [K, S', H] (S' <= S) -> per-core slices [R, C, kc, s+1, H].

    Entry [r, c, i, j] is KV head layout.column_heads(c)[0][i] (KV heads along COL) at position
    p = j * R + r (positions dealt cyclically along ROW). With more columns than KV heads a head
    lies on each of its rep columns (replicated); padded heads (None), positions >= S' and the
    last slot j = s of each row (the scratch slot) are zero.
    """
    return decode_kv_layout(layout).to_cores(np.asarray(k_KSH))


def decode_kv_layout(layout: WaferLayout) -> DecodeKVLayout:
    """The decode layout of one slot's cache under `layout` (which KV heads each column holds)."""
    column_heads = tuple(tuple(layout.column_heads(c)[0]) for c in range(layout.grid.cols))
    return DecodeKVLayout(layout.grid, layout.config.n_kv_heads, layout.s, column_heads)


def _core_copy(a: jax.Array) -> np.ndarray:
    """One core's copy of a value that every core holds alike, on the host: [R, C, ...] -> [...].

    Reads the first shard local to this process (one device-to-host copy, no dispatch), never the
    whole array, which on a mesh spanning processes lies partly on devices this process cannot read.
    """
    return np.asarray(a.addressable_data(0))[0, 0]


# Budget of an unconstrained plan (the accounting still happens).
UNLIMITED_BUDGET = 1 << 62


class WaferDecoder:
    """A decode batch of `batch` slots on a core mesh."""

    def __init__(self, params: Params, config: ModelConfig, core_mesh: CoreMesh, batch: int, max_len: int,
                 opts: MeshOptions = MeshOptions(), spec: WaferSpec | None = None):
        """Plan, tile and place the model; `spec` sets the per-core budget (default: no limit)."""
        if batch < 1:
            raise WaferError(f"decode batch must be at least 1, got {batch}")
        self.config, self.core_mesh, self.batch, self.opts = config, core_mesh, batch, opts
        self.layout = WaferLayout(config, core_mesh.grid, round_up(max_len, CACHE_BUCKET))
        grid = core_mesh.grid
        # Planning comes first: a layout that does not fit fails before anything is allocated.
        self.plan = plan_sram(self.layout.tensor_specs(batch), grid.rows, grid.cols,
                              spec or emulated_spec(UNLIMITED_BUDGET))
        self.params = params  # single-device weights: the prefill runs on them
        self.tiles = core_mesh.place(tile_params(params, self.layout))
        shape = (batch, self.layout.kc, self.layout.s_slots, config.head_dim)
        self.k_cache = tuple(core_mesh.zeros(shape) for _ in range(config.n_layers))
        self.v_cache = tuple(core_mesh.zeros(shape) for _ in range(config.n_layers))
        self.tokens = np.zeros(batch, np.int32)
        self.pos = np.zeros(batch, np.int32)
        self.active = np.zeros(batch, bool)
        self._step = jax.jit(core_mesh.run(functools.partial(core_decode_step, layout=self.layout, opts=opts)),
                             donate_argnums=(1, 2))
        self._prefiller = Generator(params, config)
        self._compiled_step = None
        self._logits = None
        self._active_placed = None
        self._knobs_placed: dict[Sampling, list] = {}
        self._landing: dict[int, _Landing] = {}  # reserved slots, filled layer by layer

    def _replicate(self, a) -> jax.Array:
        """A per-sequence value as every core's copy: [R, C, ...]."""
        return self.core_mesh.broadcast(a)

    def free_slots(self) -> list[int]:
        """Slots neither decoding nor reserved for a sequence being placed."""
        return [b for b in range(self.batch) if not self.active[b] and b not in self._landing]

    def insert(self, slot: int, k_LKSH, v_LKSH, length: int, next_token: int) -> None:
        """Place one prefilled sequence (its cache, length and next token) into a free slot."""
        self.reserve(slot, length, next_token)
        try:
            per_core_k = [cache_to_decode_layout(np.asarray(k)[:, :length], self.layout) for k in k_LKSH]
            per_core_v = [cache_to_decode_layout(np.asarray(v)[:, :length], self.layout) for v in v_LKSH]
            self.k_cache, self.v_cache = _insert_slot(self.k_cache, self.v_cache,
                                                      self.core_mesh.place(tuple(per_core_k)),
                                                      self.core_mesh.place(tuple(per_core_v)), jnp.int32(slot))
            self._landing[slot].placed.update(range(self.config.n_layers))
        except BaseException:
            self.abort(slot)
            raise
        self.commit(slot)

    def reserve(self, slot: int | None, length: int, next_token: int) -> int:
        """Reserve a free slot (`None`: the first free one) for a sequence placed layer by layer.

        The slot stays inactive until `commit`: decode steps of the other slots never write its
        positions (an inactive slot writes only the scratch slot), so layers placed while they
        keep decoding stay as placed. Returns the slot.
        """
        if slot is None:
            free = self.free_slots()
            if not free:
                raise WaferError(f"no free slot in the decode batch of {self.batch}")
            slot = free[0]
        if not 0 <= slot < self.batch:
            raise WaferError(f"slot {slot} is outside the decode batch of {self.batch}")
        if self.active[slot] or slot in self._landing:
            raise WaferError(f"slot {slot} is occupied")
        if not 1 <= length < self.layout.s * self.layout.grid.rows:
            raise WaferError(f"sequence of {length} tokens leaves no room in a cache of {self.layout.max_len}")
        if not 0 <= next_token < self.config.vocab_size:
            raise WaferError(f"next token {next_token} is outside the vocabulary [0, {self.config.vocab_size})")
        self._landing[slot] = _Landing(length, next_token, set())
        return slot

    def place_layer(self, slot: int, layer: int, k_KnH, v_KnH) -> None:
        """Place layer `layer` ([K, n, H] keys and values) of the sequence reserved in `slot`."""
        landing = self._landing.get(slot)
        if landing is None:
            raise WaferError(f"slot {slot} is not reserved")
        if not 0 <= layer < self.config.n_layers:
            raise WaferError(f"layer {layer} is outside the model's {self.config.n_layers}")
        want = (self.config.n_kv_heads, landing.length, self.config.head_dim)
        if tuple(k_KnH.shape) != want or tuple(v_KnH.shape) != want:
            raise WaferError(f"layer {layer}: K {tuple(k_KnH.shape)} / V {tuple(v_KnH.shape)}, expected {want}")
        k_new, v_new = self.core_mesh.place((cache_to_decode_layout(k_KnH, self.layout),
                                             cache_to_decode_layout(v_KnH, self.layout)))
        k, v = _insert_layer(self.k_cache[layer], self.v_cache[layer], k_new, v_new, jnp.int32(slot))
        self.k_cache = self.k_cache[:layer] + (k,) + self.k_cache[layer + 1:]
        self.v_cache = self.v_cache[:layer] + (v,) + self.v_cache[layer + 1:]
        landing.placed.add(layer)

    def commit(self, slot: int) -> None:
        """Start decoding the sequence reserved in `slot` (every layer must have been placed)."""
        landing = self._landing.get(slot)
        if landing is None:
            raise WaferError(f"slot {slot} is not reserved")
        missing = sorted(set(range(self.config.n_layers)) - landing.placed)
        if missing:
            raise WaferError(f"slot {slot}: layers {missing[:8]} were never placed")
        del self._landing[slot]
        self.tokens[slot], self.pos[slot], self.active[slot] = landing.next_token, landing.length, True

    def abort(self, slot: int) -> None:
        """Give a reserved slot back. Layers already placed stay in its cache rows unseen: the slot
        is inactive, and the next insert overwrites every position of it."""
        self._landing.pop(slot, None)

    def evict(self, slot: int) -> None:
        self.active[slot] = False

    def step(self, sampling: Sampling = Sampling()) -> np.ndarray:
        """Decode one token for every active slot; returns the tokens [B] (inactive: unchanged)."""
        tok, pos = self.step_device(sampling)
        self.tokens, self.pos = np.array(_core_copy(tok)), np.array(_core_copy(pos))
        return self.tokens.copy()

    def step_device(self, sampling: Sampling, tokens=None, pos=None):
        """Dispatch one step without reading back; returns device (tokens, positions) [R, C, B]."""
        if sampling.greedy != self.opts.greedy:
            raise WaferError("this decoder was compiled for " + ("greedy" if self.opts.greedy else "sampled")
                             + " decoding")
        tokens = self._replicate(self.tokens) if tokens is None else tokens
        pos = self._replicate(self.pos) if pos is None else pos
        args = (self.tiles, self.k_cache, self.v_cache, tokens, pos, self._device_active(), *self._knobs(sampling))
        self.compile()
        tok, new_pos, self.k_cache, self.v_cache, self._logits = self._compiled_step(*args)
        return tok, new_pos

    def last_logits(self) -> np.ndarray:
        """Logits [B, V] of the last step, gathered from the column shards of row 0."""
        # On a mesh spanning processes, other processes' cores hold shards this one cannot read.
        shards = multihost_utils.process_allgather(self._logits, tiled=True)[0]  # [C, B, v]
        return np.concatenate(list(shards), axis=-1)[:, : self.config.vocab_size]

    def _device_active(self) -> jax.Array:
        """The slot mask on the cores, placed again only when a slot changes (not every step)."""
        if self._active_placed is None or not np.array_equal(self._active_placed[0], self.active):
            self._active_placed = (self.active.copy(), self._replicate(self.active))
        return self._active_placed[1]

    def _knobs(self, sampling: Sampling) -> list:
        if sampling not in self._knobs_placed:
            self._knobs_placed[sampling] = [self._replicate(np.asarray(v, dt)) for v, dt in (
                (sampling.seed, np.uint32), (max(sampling.temperature, 1e-6), np.float32),
                (sampling.top_k, np.int32), (sampling.top_p, np.float32))]
        return self._knobs_placed[sampling]

    def compile(self) -> float:
        """Compile the decode step once (shapes are fixed per decoder); returns seconds spent now."""
        if self._compiled_step is not None:
            return 0.0
        t0 = time.perf_counter()
        r = self._replicate
        self._compiled_step = self._step.lower(self.tiles, self.k_cache, self.v_cache, r(self.tokens), r(self.pos),
                                               self._device_active(), *self._knobs(Sampling())).compile()
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_on_eos: bool = True) -> GenerationResult:
        """Prefill each prompt on one device, insert it into a slot, decode all together."""
        check_request(self.config, prompts, max_new_tokens)
        if len(prompts) > len(self.free_slots()):
            raise WaferError(f"{len(prompts)} prompts but only {len(self.free_slots())} free slots")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.layout.s * self.layout.grid.rows:
            raise WaferError(f"prompt ({longest}) + {max_new_tokens} new tokens exceeds this decoder's cache "
                             f"of {self.layout.max_len}")
        t0 = time.perf_counter()
        slots, firsts, compile_s = [], [], 0.0
        for p in prompts:
            first, cache, _, _, c = self._prefiller.prefill([p], round_up(len(p), PROMPT_BUCKET), sampling)
            compile_s += c
            slot = self.free_slots()[0]
            self.insert(slot, [k[0] for k in cache.k_LBKSH], [v[0] for v in cache.v_LBKSH], len(p),
                        int(np.asarray(first)[0]))
            slots.append(slot)
            firsts.append(int(np.asarray(first)[0]))
        ttft = time.perf_counter() - t0 - compile_s
        compile_s += self.compile()  # outside the timed loop
        state = {"tok": self._replicate(self.tokens), "pos": self._replicate(self.pos)}

        def dispatch_step():
            state["tok"], state["pos"] = self.step_device(sampling, state["tok"], state["pos"])
            return state["tok"]

        eos = set(self.config.eos_token_ids) if stop_on_eos else set()
        out, steps, decode_s = decode_loop(dispatch_step, np.asarray(firsts), max_new_tokens, eos,
                                           read_tokens=lambda t: _core_copy(t)[slots])
        self.tokens, self.pos = np.array(_core_copy(state["tok"])), np.array(_core_copy(state["pos"]))
        for s in slots:
            self.evict(s)
        return GenerationResult(out, ttft, decode_s, steps, compile_s)


@dataclasses.dataclass
class _Landing:
    """A reserved slot being filled: what it will decode from once committed."""

    length: int
    next_token: int
    placed: set[int]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert_layer(k_cache, v_cache, k_new, v_new, slot):
    """Write one layer of one sequence's per-core slices [R, C, k, s, H] into batch slot `slot`."""
    return (jax.lax.dynamic_update_index_in_dim(k_cache, k_new, slot, axis=2),
            jax.lax.dynamic_update_index_in_dim(v_cache, v_new, slot, axis=2))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert_slot(k_cache, v_cache, k_new, v_new, slot):
    """Write one sequence's per-core cache slices [R, C, k, s, H] into batch slot `slot`."""
    put = lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, slot, axis=2)
    return tuple(map(put, k_cache, k_new)), tuple(map(put, v_cache, v_new))
