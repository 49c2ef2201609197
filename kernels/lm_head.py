"""Vocabulary-sharded LM head and token selection on the mesh.

Core (r, c) holds lm[D_row, V_col]. The logits of column c's vocabulary block are a MeshGEMV
reduced over ROW (fused with the final norm, kernels/rmsnorm.py); selection then works across COL:
- greedy: each core's local (max, first index), merged with pmax then pmin over COL, which
  reproduces `argmax`'s first-occurrence tie-break over the whole vocabulary;
- sampling with top-k (k <= TOPK_CANDIDATES): each core offers its local top candidates; the
  global top k is always among them, so filtering the gathered C x TOPK_CANDIDATES candidates
  gives exactly `sample_ref`'s distribution (top-p included, which renormalizes over the top k)
  while moving a few hundred values instead of V;
- sampling without top-k (or a larger k): the shards are gathered along COL (V floats per
  sequence) and sampled by `sample_ref`.
The knobs are per row, so one batch mixes the three: each row takes the path it would take alone
(a row at temperature 0 takes the argmax), and batch neighbours never change its token. Every
core uses the same keys on the same values, so all cores pick the same token, and it is the token
`sample_ref` picks from the whole vocabulary: the noise of a candidate is its token id's
(`gumbel_noise`), so the single-device decoder and every mesh draw alike for a seed.
"""

import jax
import jax.numpy as jnp

from kernels.sampling import per_row, sample_ref
from mesh.axes import SAMPLE_SCOPE


def mask_padded_vocab(logits_Bv: jax.Array, vocab_size: int, col_axis: str) -> jax.Array:
    """Per-core: set this column's padded vocabulary entries (global id >= V) to -inf."""
    v = logits_Bv.shape[-1]
    global_id = jax.lax.axis_index(col_axis) * v + jnp.arange(v)
    return jnp.where(global_id < vocab_size, logits_Bv.astype(jnp.float32), -jnp.inf)


def argmax_mesh(logits_Bv: jax.Array, col_axis: str) -> jax.Array:
    """Global argmax [B] (int32) of logits sharded over `col_axis`, first occurrence on ties."""
    v = logits_Bv.shape[-1]
    local_idx = jnp.argmax(logits_Bv, axis=-1)
    local_max = jnp.max(logits_Bv, axis=-1)
    global_max = jax.lax.pmax(local_max, col_axis)
    global_idx = (jax.lax.axis_index(col_axis) * v + local_idx).astype(jnp.int32)
    candidate = jnp.where(local_max == global_max, global_idx, jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidate, col_axis)


# Candidates each core offers to a distributed top-k.
TOPK_CANDIDATES = 64


def sample_mesh(logits_Bv: jax.Array, col_axis: str, vocab_size: int, keys_B, temperature, top_k, top_p,
                greedy: bool) -> jax.Array:
    """Token [B] per sequence, identical on every core.

    Each row is chosen as it would be alone in the batch: by the distributed argmax when its
    temperature is 0, else from the candidates when its own top-k allows, else from the gathered
    logits. A path runs only when some row needs it (the knobs are the same on every core, so
    every core takes the same branch).

    Args:
      logits_Bv: [B, v] this column's vocabulary shard (padding at -inf).
      keys_B: [B] PRNG keys, the same on every core.
      temperature, top_k, top_p: scalars or [B], as `sample_ref` (temperature 0: argmax).
      greedy: static; distributed argmax for every row when True (the knobs are ignored).
    """
    with jax.named_scope(SAMPLE_SCOPE):
        argmax_B = argmax_mesh(logits_Bv, col_axis)
        if greedy:
            return argmax_B
        B, v = logits_Bv.shape
        temperature_B = per_row(temperature, B, jnp.float32)
        top_k_B, top_p_B = per_row(top_k, B, jnp.int32), per_row(top_p, B, jnp.float32)
        n_cand = min(TOPK_CANDIDATES, v)
        sampled_B = temperature_B > 0
        candidates_B = (top_k_B > 0) & (top_k_B <= n_cand)
        unused = jnp.zeros((B,), jnp.int32)

        def from_candidates():
            values, local_ids = jax.lax.top_k(logits_Bv, n_cand)
            ids = jax.lax.axis_index(col_axis) * v + local_ids
            values = jax.lax.all_gather(values, col_axis, axis=1, tiled=True)  # [B, C * n_cand]
            ids = jax.lax.all_gather(ids, col_axis, axis=1, tiled=True)
            pick = sample_ref(values, keys_B, temperature_B, top_k_B, top_p_B, greedy=False, ids_BV=ids,
                              vocab_size=vocab_size)
            return jnp.take_along_axis(ids, pick[:, None], axis=1)[:, 0].astype(jnp.int32)

        def from_all_logits():
            full = jax.lax.all_gather(logits_Bv, col_axis, axis=1, tiled=True)[:, :vocab_size]
            return sample_ref(full, keys_B, temperature_B, top_k_B, top_p_B, greedy=False)

        few_B = jax.lax.cond(jnp.any(sampled_B & candidates_B), from_candidates, lambda: unused)
        all_B = jax.lax.cond(jnp.any(sampled_B & ~candidates_B), from_all_logits, lambda: unused)
        return jnp.where(sampled_B, jnp.where(candidates_B, few_B, all_B), argmax_B)
