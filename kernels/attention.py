"""Grouped-query attention over a KV cache: the plain single-device reference."""

import jax
import jax.numpy as jnp


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
