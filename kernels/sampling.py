"""Token selection from logits: greedy, temperature, top-k and top-p, with a seeded PRNG.

The filters follow HF transformers' logits warpers: top-k keeps every logit tied with the k-th
largest, top-p keeps the smallest set of most likely tokens whose probability reaches p (always
at least one). Sampling parameters are traced arrays, per row or shared by every row, so
changing them never recompiles; only the all-greedy choice is static. A row is computed from its
own logits, key and knobs alone, so the rows around it never change its token.

A draw is the Gumbel-max trick with the noise tied to token ids: token t of a row gets noise
`gumbel_noise(key)[t]`, whatever subset of the vocabulary is scored. A sharded sampler that
scores only a few candidates (kernels/lm_head.py) therefore picks exactly the token this one
picks from the whole vocabulary, so a seeded request gets the same tokens on every mesh.
"""

import jax
import jax.numpy as jnp

# Temperatures below this are raised to it: dividing by a smaller one overflows float32 logits.
MIN_TEMPERATURE = 1e-6


def per_row(value, B: int, dtype) -> jax.Array:
    """A knob given as a scalar (every row alike) or [B] (one per row), as [B]."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (B,))


def gumbel_noise(keys_B: jax.Array, vocab_size: int, ids_BN: jax.Array | None = None) -> jax.Array:
    """Each row's Gumbel noise at token ids `ids_BN` [B, N] (None: every id, [B, V])."""
    full_BV = jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys_B)
    if ids_BN is None:
        return full_BV
    return jnp.take_along_axis(full_BV, jnp.clip(ids_BN, 0, vocab_size - 1), axis=1)


def sample_ref(logits_BV: jax.Array, keys_B: jax.Array, temperature, top_k, top_p, greedy: bool,
               ids_BV: jax.Array | None = None, vocab_size: int | None = None) -> jax.Array:
    """Pick one token per row.

    Args:
      logits_BV: [B, V] float logits.
      keys_B: [B] typed PRNG keys (`jax.random.key`), one per row.
      temperature: scalar or [B] >= 0; a row at 0 takes the argmax.
      top_k: int scalar or [B]; 0 disables the filter.
      top_p: float scalar or [B] in (0, 1]; 1 disables the filter.
      greedy: static; argmax for every row when True (the knobs are ignored).
      ids_BV, vocab_size: when the V columns are candidates drawn from a larger vocabulary, their
        token ids [B, V] and the vocabulary's size (static), so each gets its token's noise.

    Returns:
      [B] int32 indices into the V columns (token ids when `ids_BV` is None).
    """
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax_B
    B, V = logits_BV.shape
    temperature_B = per_row(temperature, B, jnp.float32)
    top_k_B, top_p_B = per_row(top_k, B, jnp.int32), per_row(top_p, B, jnp.float32)
    scaled = logits_BV.astype(jnp.float32) / jnp.maximum(temperature_B, MIN_TEMPERATURE)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k: threshold at the k-th largest logit (k = 0 means all V).
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k_B - 1)[:, None], axis=-1)
    # top-p: keep a token while the probability mass strictly before it is below p.
    probs_desc = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_desc, axis=-1) - probs_desc
    keep_desc = (mass_before < top_p_B[:, None]) & (sorted_desc >= kth)
    keep_desc = keep_desc.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep_desc, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    noise = gumbel_noise(keys_B, V if vocab_size is None else vocab_size, ids_BV)
    sampled_B = jnp.argmax(filtered + noise, axis=-1).astype(jnp.int32)
    return jnp.where(temperature_B == 0, argmax_B, sampled_B)
