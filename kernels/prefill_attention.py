"""Blocked causal attention for prefill: flash-style online softmax over KV blocks, GQA.

The plain reference is `kernels.attention.gqa_attention_ref` with the visible mask
`s <= q_start[b] + t and s < kv_len[b]`; it builds the whole [T, S] score matrix, which this
kernel never does.
"""

import jax
import jax.numpy as jnp

from mesh.extent import ceil_div


def blocked_causal_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                             q_start_B: jax.Array, kv_len_B: jax.Array, *,
                             q_block: int = 128, kv_block: int = 128) -> jax.Array:
    """Causal attention of T new queries over S keys, one [q_block, kv_block] score block at a time.

    Query t of sequence b sits at absolute position q_start_B[b] + t and sees key positions s with
    s <= q_start_B[b] + t and s < kv_len_B[b]. kv_len masks the right padding of variable-length
    prompts; q_start > 0 is a prefill chunk extending an existing cache. Scores and softmax
    statistics are float32; a query row that sees no key (an empty sequence) returns zeros.

    Memory is linear in T and S: queries are walked block by block (`lax.map`) and, inside each,
    keys block by block (`fori_loop`), so the largest score temporary is
    [B, K, G, q_block, kv_block]. 128 x 128 blocks were the fastest of 64 to 512 on this CPU
    for SmolLM2 at 8 x 512 (bench/RESULTS.md). Block letters in the names below: Q query blocks
    of q queries each, J KV blocks of s keys each (s is one block's slice of S).

    Args:
      q_BTNH: [B, T, N, H] queries (already rotated), N = K * G.
      k_BKSH: [B, K, S, H] keys (already rotated), cache positions 0..S-1.
      v_BKSH: [B, K, S, H] values.
      q_start_B: [B] int, absolute position of query 0 of each sequence.
      kv_len_B: [B] int, number of valid key positions of each sequence (the rest is padding).
      q_block: queries per block (clamped to T).
      kv_block: keys per block (clamped to S).

    Returns:
      [B, T, N, H] attention output, dtype of q.
    """
    with jax.named_scope("prefill_attention"):
        B, T, N, H = q_BTNH.shape
        K, S = k_BKSH.shape[1], k_BKSH.shape[2]
        G = N // K
        # Clamping keeps T = 1 (or a short prompt) from padding up to a whole 128 block.
        qb, kb = min(q_block, T), min(kv_block, S)
        nq, nk = ceil_div(T, qb), ceil_div(S, kb)
        # Padded keys sit at positions >= S >= the clamped kv_len, so the mask hides them;
        # padded query rows are computed and sliced off.
        q_pad = jnp.pad(q_BTNH, ((0, 0), (0, nq * qb - T), (0, 0), (0, 0)))
        kv_pad = ((0, 0), (0, 0), (0, nk * kb - S), (0, 0))
        # Block index leading so each loop step reads one contiguous block by dynamic index.
        q_QBKGqH = q_pad.reshape(B, nq, qb, K, G, H).transpose(1, 0, 3, 4, 2, 5)
        k_JBKsH = jnp.pad(k_BKSH, kv_pad).reshape(B, K, nk, kb, H).transpose(2, 0, 1, 3, 4)
        v_JBKsH = jnp.pad(v_BKSH, kv_pad).reshape(B, K, nk, kb, H).transpose(2, 0, 1, 3, 4)
        q_start_B = q_start_B.astype(jnp.int32)
        kv_len_B = jnp.minimum(kv_len_B.astype(jnp.int32), S)
        scale = H ** -0.5

        def q_block_attention(args):
            i, q_BKGqH = args
            q_pos_Bq = q_start_B[:, None] + i * qb + jnp.arange(qb, dtype=jnp.int32)
            # Exclusive bound on the visible keys of each query row: causal and padding in one.
            limit_Bq = jnp.minimum(q_pos_Bq + 1, kv_len_B[:, None])
            # KV blocks wholly beyond every row's limit hold no visible key: skip them, which
            # halves causal prefill work. A dynamic trip count is fine for inference (no grad).
            n_kv = jnp.clip(ceil_div(jnp.max(limit_Bq), kb), 0, nk)

            def kv_step(j, carry):
                m_BKGq, l_BKGq, acc_BKGqH = carry
                k_BKsH, v_BKsH = k_JBKsH[j], v_JBKsH[j]
                scores_BKGqs = jnp.einsum("BKGqH,BKsH->BKGqs", q_BKGqH, k_BKsH,
                                          preferred_element_type=jnp.float32) * scale
                kv_pos_s = j * kb + jnp.arange(kb, dtype=jnp.int32)
                visible_Bqs = kv_pos_s[None, None, :] < limit_Bq[:, :, None]
                scores_BKGqs = jnp.where(visible_Bqs[:, None, None], scores_BKGqs, -jnp.inf)
                m_new = jnp.maximum(m_BKGq, jnp.max(scores_BKGqs, axis=-1))
                # A row with nothing visible yet keeps m = -inf; shifting by 0 instead makes
                # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(m_BKGq - m_safe)
                p = jnp.exp(scores_BKGqs - m_safe[..., None])
                l_new = alpha * l_BKGq + jnp.sum(p, axis=-1)
                pv = jnp.einsum("BKGqs,BKsH->BKGqH", p.astype(v_BKsH.dtype), v_BKsH,
                                preferred_element_type=jnp.float32)
                return m_new, l_new, alpha[..., None] * acc_BKGqH + pv

            init = (jnp.full((B, K, G, qb), -jnp.inf, jnp.float32),
                    jnp.zeros((B, K, G, qb), jnp.float32),
                    jnp.zeros((B, K, G, qb, H), jnp.float32))
            _, l_BKGq, acc_BKGqH = jax.lax.fori_loop(0, n_kv, kv_step, init)
            # l = 0 only where no key was visible, and there acc is 0 too: the row gives zeros.
            out = acc_BKGqH / jnp.where(l_BKGq > 0, l_BKGq, 1.0)[..., None]
            return out.astype(q_BTNH.dtype)

        out_QBKGqH = jax.lax.map(q_block_attention, (jnp.arange(nq, dtype=jnp.int32), q_QBKGqH))
        out = out_QBKGqH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * qb, N, H)
        return out[:, :T]
