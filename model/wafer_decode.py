"""Wafer decode: the transformer decode step as the program of one core, over an R×C core mesh.

Each core holds only its own weight tiles and its slice of the KV cache (see wafer_layout.py for
what lies where, cache_layout.py for the cache) and talks to the rest of the mesh only through
collectives along ROW and COL. The decode batch has B slots with independent positions
(slot_batch.py places sequences into them and drives this step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.allreduce import Schedule, allreduce
from kernels.attention import decode_attention_mesh
from kernels.lm_head import mask_padded_vocab
from kernels.mesh_gemv import mesh_gemv
from kernels.rmsnorm import rmsnorm_gemv_mesh
from kernels.rope import rope_cos_sin
from mesh.axes import COL, EMBED_SCOPE, LM_HEAD_SCOPE, ROW, layer_scope
from mesh.executors import Executor
from model.block import BlockOps, BlockShape, embed_from_vocab_shard, inv_freq_for, transformer_block
from model.cache import write_kv
from model.config import ModelConfig
from model.sampling import sample_vocab_shards
from model.wafer_layout import WaferLayout


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """Static choices of the per-core program."""

    schedule: Schedule = Schedule.PSUM
    groups: int | None = None  # K-tree groups per axis (None: ~sqrt of the axis length)
    # True: every slot takes the argmax (the knobs are not read). False: each slot follows its own
    # knobs, so greedy (temperature 0) and sampled slots share one batch.
    greedy: bool = True


def mesh_ops(config: ModelConfig, opts: MeshOptions, attend) -> BlockOps:
    """The block on a wafer: every projection is a MeshGEMV over the whole grid (RMSNorm fused into
    the ones whose input is normed), reduced with `opts`' schedule."""
    sched, groups = opts.schedule, opts.groups
    return BlockOps(
        norm_project=lambda x, norm_w, w: rmsnorm_gemv_mesh(x, norm_w, w, config.rms_eps, config.dim, ROW, sched,
                                                             groups),
        project_out=lambda a, w: mesh_gemv(a, w, COL, sched, groups),
        attend=attend)


def local_inv_freq(layout: WaferLayout):
    """Per-core: the RoPE inverse frequencies [hc/2] of this core's rotary pairs (all H/2 with
    whole heads; the pairs of its head-dim slice in the full-grid layout, zero for padding)."""
    inv_freq = inv_freq_for(layout.config)
    if layout.seg == 1:
        return inv_freq
    pairs = layout.rope_pairs()  # [seg, hc/2]
    table = np.where(pairs >= 0, inv_freq[np.maximum(pairs, 0)], 0.0).astype(np.float32)
    return jnp.asarray(table)[jax.lax.axis_index(COL) % layout.seg]


def write_kv_device_block(cache_BKSH: jax.Array, new_BKTH: jax.Array, start_B: jax.Array) -> jax.Array:
    """`write_kv` for the DEVICES executor, on the cache as a device stores it: the [1, 1, *local]
    block of [R, C, *local]. The write then has the step's output shape, and XLA updates the
    donated cache in place.

    Written on the local view, the write feeds two readers of different shapes (attention reads
    [B, K, S, H], the step returns the [1, 1, B, K, S, H] block), and XLA fused it into each of
    them, each on its own copy of the cache: five copies of every layer's cache per step
    (docs/mesh/PROFILE.md). Under vmap (VCORES) the same view costs a copy per cache that the
    plain write does not, so only DEVICES takes it.
    """
    cache_11BKSH = cache_BKSH[None, None]
    new_BKTH = new_BKTH.astype(cache_BKSH.dtype)
    for b in range(cache_BKSH.shape[0]):  # one write per sequence, as in `write_kv`
        cache_11BKSH = jax.lax.dynamic_update_slice(cache_11BKSH, new_BKTH[None, None, b:b + 1],
                                                    (0, 0, b, 0, start_B[b], 0))
    return cache_11BKSH[0, 0]


def core_decode_step(tiles, k_cache, v_cache, tokens_B, pos_B, active_B, seed_B, temperature_B, top_k_B, top_p_B,
                     *, layout: WaferLayout, opts: MeshOptions, executor: Executor = Executor.VCORES):
    """One decode step of one core.

    Args (all local to this core):
      tiles: this core's weight tiles (wafer_layout.tile_params, without the [R, C] axes).
      k_cache, v_cache: L arrays [B, kc, s+1, hc]: this core's KV heads, head dimensions and cache
        positions.
      tokens_B: [B] the tokens to feed (the same on every core).
      pos_B: [B] their positions; active_B: [B] bool, which slots hold a live sequence.
      seed_B, temperature_B, top_k_B, top_p_B: each slot's sampling knobs [B] (the same on every
        core); ignored when `opts.greedy`, else a slot at temperature 0 takes the argmax.
      executor: the executor that runs this program: only how the cache write is expressed
        depends on it (`write_kv_device_block`), never a value.

    Returns:
      next tokens [B], next positions [B] and the updated cache, identical on every core, and
      this column's logits [B, v] (for checks against the single-device decoder).
    """
    cfg: ModelConfig = layout.config
    R = layout.grid.rows
    B = tokens_B.shape[0]
    kc, gc, hc, d = layout.kc, layout.gc, layout.hc, layout.d
    sched, groups = opts.schedule, opts.groups
    r = jax.lax.axis_index(ROW)
    assert tiles["lm"].shape == (d, layout.v), tiles["lm"].shape
    assert k_cache[0].shape == (B, kc, layout.s_slots, hc), k_cache[0].shape

    with jax.named_scope(EMBED_SCOPE):
        x_Bd = embed_from_vocab_shard(tiles, tokens_B, layout.v, lambda a: allreduce(a, COL, sched, groups))

    cos_BH, sin_BH = rope_cos_sin(pos_B, local_inv_freq(layout))
    # Cache positions are dealt cyclically over rows: position p lives on row p % R at p // R.
    mine_B = (pos_B % R == r) & active_B
    slot_B = jnp.where(mine_B, pos_B // R, layout.s)  # layout.s: the scratch slot
    j = jnp.arange(layout.s_slots)[None, :]
    visible_Bs = (j < layout.s) & (j * R + r <= pos_B[:, None])

    write = write_kv_device_block if executor is Executor.DEVICES else write_kv

    def attend(q, k, v, k_cache_i, v_cache_i):
        kcache = write(k_cache_i, k[:, :, None], slot_B)
        vcache = write(v_cache_i, v[:, :, None], slot_B)
        out = decode_attention_mesh(q, kcache, vcache, visible_Bs, ROW, sched, groups, dim_axis=COL,
                                    dim_segment=layout.seg, head_dim=cfg.head_dim)
        return out, kcache, vcache

    shape = BlockShape((kc, gc), kc, hc, layout.f)
    ops = mesh_ops(cfg, opts, attend)
    new_k, new_v = [], []
    for i, t in enumerate(tiles["layers"]):
        with jax.named_scope(layer_scope(i)):
            x_Bd, kcache, vcache = transformer_block(t, x_Bd, cos_BH, sin_BH, k_cache[i], v_cache[i], shape=shape,
                                                     ops=ops)
        new_k.append(kcache)
        new_v.append(vcache)

    with jax.named_scope(LM_HEAD_SCOPE):
        logits_Bv = ops.norm_project(x_Bd, tiles["final_norm"], tiles["lm"])
        logits_Bv = mask_padded_vocab(logits_Bv, cfg.vocab_size, COL)
    # The same keys as the single-device decoder: fold the position of the token being chosen.
    next_B = sample_vocab_shards(logits_Bv, cfg.vocab_size, pos_B + 1, seed_B, temperature_B, top_k_B, top_p_B,
                                 opts.greedy)
    next_B = jnp.where(active_B, next_B, tokens_B)
    return next_B, pos_B + active_B.astype(pos_B.dtype), tuple(new_k), tuple(new_v), logits_Bv
