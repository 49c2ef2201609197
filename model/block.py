"""The transformer block, written once for the single-device reference, the wafer decode step and
the prefill mesh.

What every path shares is written here: the embedding lookup from a vocabulary shard, the QKV split
with RoPE, SwiGLU, and the block itself. What differs between paths is a `BlockOps` the caller
passes: how a normed input meets a weight (a local matmul, or MeshGEMV reduced over the mesh), how
an output projection is reduced (not at all, a psum over columns, or MeshGEMV), and how the new
keys and values reach the cache and are attended to (the cache layout).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import apply_rope_ref, rope_inv_freq
from mesh.axes import ATTENTION_SCOPE, COL, MLP_SCOPE
from model.config import ModelConfig, RopeScaling


def inv_freq_for(config: ModelConfig):
    """RoPE inverse frequencies [H/2] of `config` (Llama-3 scaled where the config says so)."""
    scaling = None
    if config.rope_scaling is RopeScaling.LLAMA3:
        scaling = dict(factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                       high_freq_factor=config.rope_high_freq_factor,
                       original_max_pos=config.rope_original_max_pos)
    return rope_inv_freq(config.head_dim, config.rope_theta, scaling)


def embed_from_vocab_shard(tiles, tokens, v: int, sum_over_cols: Callable) -> jax.Array:
    """Per-core: embedding rows [..., d] of `tokens` [...] (the same on every core).

    Column c holds vocabulary rows c*v .. c*v + v - 1, in `tiles["embed"]` [v, d] or, with tied
    embeddings, as the LM head's `tiles["lm"]` [d, v]. Exactly one column holds each token's row,
    so `sum_over_cols` (a sum over COL) is exact.
    """
    local_tok = tokens - jax.lax.axis_index(COL) * v
    in_block = (local_tok >= 0) & (local_tok < v)
    safe = jnp.clip(local_tok, 0, v - 1)
    rows = tiles["embed"][safe] if "embed" in tiles else jnp.moveaxis(jnp.take(tiles["lm"], safe, axis=1), 0, -1)
    return sum_over_cols(jnp.where(in_block[..., None], rows, 0.0))


def qkv_rope(qkv, q_heads: tuple[int, ...], kv_heads: int, head_dim: int, cos, sin):
    """Split a fused QKV output [..., (Q + 2 kv) H] into rotated q [..., *q_heads, H], rotated
    k and plain v [..., kv, H]. `cos`, `sin` [..., H] broadcast against the leading axes."""
    lead, H = qkv.shape[:-1], head_dim
    nq = math.prod(q_heads) * H
    q = qkv[..., :nq].reshape(lead + tuple(q_heads) + (H,))
    k = qkv[..., nq: nq + kv_heads * H].reshape(lead + (kv_heads, H))
    v = qkv[..., nq + kv_heads * H:].reshape(lead + (kv_heads, H))
    per_q = cos.shape[:-1] + (1,) * len(q_heads) + cos.shape[-1:]
    per_kv = cos.shape[:-1] + (1,) + cos.shape[-1:]
    q = apply_rope_ref(q, cos.reshape(per_q), sin.reshape(per_q))
    k = apply_rope_ref(k, cos.reshape(per_kv), sin.reshape(per_kv))
    return q, k, v


def swiglu(gate_up, f: int):
    """SiLU(gate) * up of a fused [..., 2f] gate|up projection -> [..., f]."""
    return jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """This path's (local) head and feed-forward extents."""

    q_heads: tuple[int, ...]  # query heads as q's head axes: (N,), (nc,) or (kc, gc)
    kv_heads: int  # KV heads this path holds
    head_dim: int  # H
    ffn: int  # the feed-forward width this path holds (F or f)


@dataclasses.dataclass(frozen=True)
class BlockOps:
    """What differs between paths: how the block's matmuls are reduced and where the cache lies.

    norm_project(x, norm_w, W): RMSNorm(x) @ W, reduced as the path needs (QKV, gate|up, LM head).
    project_out(a, W): a @ W, reduced as the path needs (output and down projections).
    Both accumulate (and reduce) in float32; the block rounds their results to the residual
    stream's dtype, so a 16-bit model keeps 16-bit activations.
    attend(q, k, v, k_cache, v_cache): write the new keys and values, attend; returns
      (attention output with q's shape, k_cache, v_cache).
    """

    norm_project: Callable
    project_out: Callable
    attend: Callable


def xla_matmul(a, w):
    """a[..., K] @ w[K, N], accumulated in float32, by XLA's dot."""
    return jnp.matmul(a, w, preferred_element_type=jnp.float32)


def dense_ops(eps: float, attend: Callable, reduce_out: Callable = lambda y: y,
              matmul: Callable = xla_matmul) -> BlockOps:
    """Local matmuls (the single device; a prefill column, whose projections `reduce_out` sums).

    `matmul(a, w)`: a[..., K] @ w[K, N] accumulated in float32 (the single device passes the
    CPU GEMV kernel's `matmul_f32`, which is XLA's dot wherever the kernel does not apply).
    """
    return BlockOps(norm_project=lambda x, norm_w, w: matmul(rmsnorm_ref(x, norm_w, eps), w),
                    project_out=lambda a, w: reduce_out(matmul(a, w)), attend=attend)


def transformer_block(t, x, cos, sin, k_cache, v_cache, *, shape: BlockShape, ops: BlockOps):
    """One pre-norm block (attention, then SwiGLU MLP) on the residual stream x [..., D or d].

    Returns the new residual stream and this layer's updated k_cache, v_cache.
    """
    dt = x.dtype
    with jax.named_scope(ATTENTION_SCOPE):
        qkv = ops.norm_project(x, t["attn_norm"], t["w_qkv"]).astype(dt)
        if "b_qkv" in t:
            qkv = qkv + t["b_qkv"]
        q, k, v = qkv_rope(qkv, shape.q_heads, shape.kv_heads, shape.head_dim, cos, sin)
        attn, k_cache, v_cache = ops.attend(q, k, v, k_cache, v_cache)
        x = x + ops.project_out(attn.astype(dt).reshape(x.shape[:-1] + (-1,)), t["w_o"]).astype(dt)
    with jax.named_scope(MLP_SCOPE):
        gate_up = ops.norm_project(x, t["mlp_norm"], t["w_gate_up"]).astype(dt)
        x = x + ops.project_out(swiglu(gate_up, shape.ffn), t["w_down"]).astype(dt)
    return x, k_cache, v_cache
