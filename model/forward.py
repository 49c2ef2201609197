"""The single-device reference forward pass: prefill of a batch of prompts and the decode step.

Both are one function, `forward`: T new tokens per sequence at positions start_B[b] + t, written
into the KV cache, each attending to every cached position up to its own. Prefill is T = the
padded prompt length with start 0; decode is T = 1 at each sequence's current length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.decode_attention_cpu import decode_attention_prefix
from kernels.gemv_cpu import WLayout, matmul_f32
from kernels.prefill_attention import blocked_causal_attention
from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import rope_cos_sin
from mesh.axes import EMBED_SCOPE, LM_HEAD_SCOPE, layer_scope
from model.block import BlockShape, dense_ops, inv_freq_for, transformer_block
from model.cache import KVCache, write_kv
from model.config import ModelConfig
from model.weights import Params, lm_head_weight


def _cache_attention(start_B):
    """The single-device cache [B, K, S, H]: T new positions per sequence written at start_B."""

    def attend(q_BTNH, k_BTKH, v_BTKH, k_cache_BKSH, v_cache_BKSH):
        B, T, N, H = q_BTNH.shape
        K = k_BTKH.shape[2]
        k_cache_BKSH = write_kv(k_cache_BKSH, k_BTKH.transpose(0, 2, 1, 3), start_B)
        v_cache_BKSH = write_kv(v_cache_BKSH, v_BTKH.transpose(0, 2, 1, 3), start_B)
        if T == 1:  # decode: over the visible prefix (the CPU kernel, or XLA's copy-free elementwise form)
            attn_BTNH = decode_attention_prefix(q_BTNH.reshape(B, K, N // K, H), k_cache_BKSH, v_cache_BKSH,
                                                start_B + 1).reshape(B, 1, N, H)
        else:  # prefill: blocked, so memory grows linearly with the prompt (no T x S scores)
            attn_BTNH = blocked_causal_attention(q_BTNH, k_cache_BKSH, v_cache_BKSH, start_B, start_B + T)
        return attn_BTNH, k_cache_BKSH, v_cache_BKSH
    return attend


def forward(params: Params, config: ModelConfig, tokens_BT: jax.Array, start_B: jax.Array,
            last_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run T tokens per sequence through the model, extending the cache.

    Args:
      tokens_BT: [B, T] int32 token ids (padding past a prompt's end is allowed: it lands in
        cache positions the sequence has not reached, which later writes overwrite and masks hide).
      start_B: [B] int32 position of tokens_BT[:, 0] in each sequence.
      last_B: [B] int32 index t of the token whose logits are wanted (prompt length - 1 in a
        prefill, 0 in a decode step). Only those rows go through the LM head.
      cache: L layers of [B, K, S, H]; requires start + T <= S.

    Returns:
      logits_BV (float32) at `last_B`, and the updated cache.
    """
    B, T = tokens_BT.shape
    with jax.named_scope(EMBED_SCOPE):
        x_BTD = jnp.take(params["embed"], tokens_BT, axis=0)
    pos_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cos_BTH, sin_BTH = rope_cos_sin(pos_BT, inv_freq_for(config))
    shape = BlockShape((config.n_heads,), config.n_kv_heads, config.head_dim, config.ffn_dim)
    ops = dense_ops(config.rms_eps, _cache_attention(start_B), matmul=matmul_f32)
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):
        with jax.named_scope(layer_scope(i)):
            x_BTD, k, v = transformer_block(layer, x_BTD, cos_BTH, sin_BTH, cache.k_LBKSH[i], cache.v_LBKSH[i],
                                            shape=shape, ops=ops)
        new_k.append(k)
        new_v.append(v)
    with jax.named_scope(LM_HEAD_SCOPE):
        x_BD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
        x_BD = rmsnorm_ref(x_BD, params["final_norm"], config.rms_eps)
        logits_BV = matmul_f32(x_BD, lm_head_weight(params), WLayout.NK)
    return logits_BV, KVCache(tuple(new_k), tuple(new_v))
