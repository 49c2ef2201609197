"""Grouped-query attention over a KV cache: the single-device reference and the per-core
decode attention over a cache split across the mesh."""

import jax
import jax.numpy as jnp

from kernels.allreduce import allreduce


def gqa_attention_ref(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                      visible_BTS: jax.Array) -> jax.Array:
    """Softmax attention of T queries over S cached keys, N query heads sharing K KV heads.

    Args:
      q_BTNH: [B, T, N, H] queries (already rotated).
      k_BKSH: [B, K, S, H] keys (already rotated).
      v_BKSH: [B, K, S, H] values.
      visible_BTS: [B, T, S] bool, True where query t may attend to key s.

    Returns:
      [B, T, N, H] attention output.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH) * (H ** -0.5)
    scores = jnp.where(visible_BTS[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def decode_attention_mesh(q_BKGH: jax.Array, k_BKsH: jax.Array, v_BKsH: jax.Array, visible_Bs: jax.Array,
                          seq_axis: str, schedule, groups: int | None = None) -> jax.Array:
    """Per-core decode attention over this core's slice of the cache positions.

    Each core computes a partial softmax over its own positions (local max m, local sum l,
    unnormalized output o); the partials merge along `seq_axis` by log-sum-exp: with the global
    max M, l = sum l_i e^(m_i - M) and o = sum o_i e^(m_i - M). A core that sees no visible
    position contributes exact zeros.

    Args:
      q_BKGH: [B, k, G, H] queries of this core's k KV heads (G query heads each).
      k_BKsH, v_BKsH: [B, k, s, H] this core's cache slice (s positions).
      visible_Bs: [B, s] bool, which local positions the current token may attend to.

    Returns:
      [B, k, G, H] attention output, identical on every core along `seq_axis`.
    """
    H = q_BKGH.shape[-1]
    with jax.named_scope("decode_attention"):
        scores = jnp.einsum("BKGH,BKSH->BKGS", q_BKGH, k_BKsH) * (H ** -0.5)
        scores = jnp.where(visible_Bs[:, None, None, :], scores.astype(jnp.float32), -jnp.inf)
        m_local = jnp.max(scores, axis=-1)
        m_safe = jnp.where(jnp.isfinite(m_local), m_local, 0.0)
        p = jnp.exp(scores - m_safe[..., None])  # masked positions: exp(-inf) = 0
        l_local = jnp.sum(p, axis=-1)
        o_local = jnp.einsum("BKGS,BKSH->BKGH", p.astype(v_BKsH.dtype), v_BKsH)
        m_global = jax.lax.pmax(m_local, seq_axis)
        scale = jnp.where(jnp.isfinite(m_local), jnp.exp(m_safe - m_global), 0.0)
        l = allreduce(l_local * scale, seq_axis, schedule, groups)
        o = allreduce(o_local * scale[..., None], seq_axis, schedule, groups)
        return o / l[..., None]
