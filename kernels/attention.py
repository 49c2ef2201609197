"""Grouped-query attention over a KV cache: the single-device reference and the per-core
decode attention over a cache split across the mesh."""

import jax
import jax.numpy as jnp

from kernels.allreduce import ReduceOp, allreduce


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


def decode_attention_partial(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, visible_BS: jax.Array,
                             scale: float | None = None, sum_scores=None):
    """Softmax attention of one new token per sequence over S cached positions, unnormalized.

    Written as elementwise products and sums, not `einsum`: XLA on CPU lowered a dot that reads a
    freshly updated cache with two to four full copies of that cache per layer per step, and the
    fused elementwise form with none. One query per sequence makes it memory bound either way.

    Args:
      q_BKGH: [B, K, G, H] queries (G per KV head).
      k_BKSH, v_BKSH: [B, K, S, H] the cache.
      visible_BS: [B, S] bool, which positions the token may attend to.
      scale: the score scale (default H ** -0.5 of q's last axis; a head-dim slice passes the
        whole head's).
      sum_scores: completes partial dot products [B, K, G, S] (a segmented all-reduce when each
        core holds a slice of the head dimension); None: q and k are whole heads.

    Returns:
      (m [B, K, G] max score, -inf when nothing is visible; l [B, K, G] sum of exp(score - m);
      o [B, K, G, H] the exp-weighted sum of values). The attention output is o / l.
    """
    scale = q_BKGH.shape[-1] ** -0.5 if scale is None else scale
    # Products and sums in float32 (a no-op for a float32 cache): a 16-bit cache is only storage.
    f32 = jnp.float32
    scores = jnp.sum(q_BKGH[:, :, :, None, :].astype(f32) * k_BKSH[:, :, None, :, :].astype(f32), axis=-1)  # BKGS
    if sum_scores is not None:
        scores = sum_scores(scores)
    scores = scores * scale
    scores = jnp.where(visible_BS[:, None, None, :], scores.astype(jnp.float32), -jnp.inf)
    m = jnp.max(scores, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m_safe[..., None])  # masked positions: exp(-inf) = 0
    # p is rounded to the cache's dtype (as a 16-bit p @ V would), then accumulated in float32.
    o = jnp.sum(p[..., None].astype(v_BKSH.dtype).astype(f32) * v_BKSH[:, :, None, :, :].astype(f32), axis=-2)
    return m, jnp.sum(p, axis=-1), o


def decode_attention_mesh(q_BKGH: jax.Array, k_BKsH: jax.Array, v_BKsH: jax.Array, visible_Bs: jax.Array,
                          seq_axis: str, schedule, groups: int | None = None, *, dim_axis: str | None = None,
                          dim_segment: int = 1, head_dim: int | None = None) -> jax.Array:
    """Per-core decode attention over this core's slice of the cache positions.

    Each core computes a partial softmax over its own positions (local max m, local sum l,
    unnormalized output o); the partials merge along `seq_axis` by log-sum-exp: with the global
    max M, l = sum l_i e^(m_i - M) and o = sum o_i e^(m_i - M). A core that sees no visible
    position contributes exact zeros.

    With `dim_axis`, each core holds a slice h of every head's dimension (q, k and v alike), the
    heads' slices lying on `dim_segment` contiguous cores along `dim_axis`: each core's scores are
    partial dot products, summed by an all-reduce segmented to those cores before the softmax;
    p·V then gives each core its slice of the output.

    Args:
      q_BKGH: [B, k, G, h] queries of this core's k KV heads (G query heads each); h = H, or
        the core's head-dim slice.
      k_BKsH, v_BKsH: [B, k, s, h] this core's cache slice (s positions).
      visible_Bs: [B, s] bool, which local positions the current token may attend to.
      head_dim: H of the whole head, for the score scale (default: h).

    Returns:
      [B, k, G, h] attention output, identical on every core along `seq_axis`.
    """
    with jax.named_scope("decode_attention"):
        sum_scores = None
        if dim_axis is not None and dim_segment > 1:
            sum_scores = lambda s: allreduce(s, dim_axis, schedule, groups, segment=dim_segment)
        scale = None if head_dim is None else head_dim ** -0.5
        m_local, l_local, o_local = decode_attention_partial(q_BKGH, k_BKsH, v_BKsH, visible_Bs, scale, sum_scores)
        # The max travels by the same schedule as the sums (a native pmax would have no wafer route).
        m_global = allreduce(m_local, seq_axis, schedule, groups, ReduceOp.MAX)
        scale = jnp.where(jnp.isfinite(m_local), jnp.exp(m_local - m_global), 0.0)
        # l rides along with o in one all-reduce: one synchronization of the cores, not two.
        both = allreduce(jnp.concatenate([o_local, l_local[..., None]], axis=-1) * scale[..., None],
                         seq_axis, schedule, groups)
        return both[..., :-1] / both[..., -1:]
