"""Token selection from logits: greedy, temperature, top-k and top-p, with a seeded PRNG.

The filters follow HF transformers' logits warpers: top-k keeps every logit tied with the k-th
largest, top-p keeps the smallest set of most likely tokens whose probability reaches p (always
at least one). Sampling parameters are traced arrays, so changing them never recompiles; only
the greedy/sampling choice is static.
"""

import jax
import jax.numpy as jnp


def sample_ref(logits_BV: jax.Array, keys_B: jax.Array, temperature: jax.Array, top_k: jax.Array,
               top_p: jax.Array, greedy: bool) -> jax.Array:
    """Pick one token per row.

    Args:
      logits_BV: [B, V] float logits.
      keys_B: [B] typed PRNG keys (`jax.random.key`), one per row.
      temperature: scalar > 0 (ignored when greedy).
      top_k: int scalar; 0 disables the filter.
      top_p: float scalar in (0, 1]; 1 disables the filter.
      greedy: static; argmax when True.

    Returns:
      [B] int32 token ids.
    """
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    scaled = logits_BV.astype(jnp.float32) / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k: threshold at the k-th largest logit (k = 0 means all V).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take(sorted_desc, k - 1, axis=-1)[:, None]
    # top-p: keep a token while the probability mass strictly before it is below p.
    probs_desc = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_desc, axis=-1) - probs_desc
    keep_desc = (mass_before < top_p) & (sorted_desc >= kth)
    keep_desc = keep_desc.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep_desc, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys_B, filtered).astype(jnp.int32)
