"""RMSNorm: the single-device reference and the per-core version for a vector split over a mesh axis."""

import jax
import jax.numpy as jnp

from kernels.allreduce import allreduce


def rmsnorm_ref(x_D: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    """`w * x / rms(x)` over the last axis, statistics in float32 (as HF Llama does).

    Args:
      x_D: [..., D] activations.
      w_D: [D] scale.
      eps: added to the mean square before the reciprocal square root.
    """
    x32 = x_D.astype(jnp.float32)
    mean_sq = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return w_D * (x32 * jax.lax.rsqrt(mean_sq + eps)).astype(x_D.dtype)


def rmsnorm_gemv_mesh(x_Bd: jax.Array, w_d: jax.Array, w_do: jax.Array, eps: float, true_dim: int, axis: str,
                      schedule, groups: int | None = None) -> jax.Array:
    """Per-core `rmsnorm(x) @ W` for x[D_axis] and W[D_axis, out], with one all-reduce, not two.

    The norm's scale is one number per sequence, so it can be applied after the product:
    rmsnorm(x) @ W = ((x * w) @ W) * rsqrt(mean(x^2) + eps). The partial product and the partial
    sum of squares then travel in the same all-reduce along `axis`. On a mesh every collective is
    a synchronization of all cores, so this halves the synchronizations of the norms. The
    rounding differs from normalize-then-multiply by a few float32 ulps.

    Args:
      x_Bd: [B, d] this core's slice of the activations.
      w_d: [d] the matching slice of the norm scale (zero in padding).
      w_do: [d, o] this core's weight tile.
    """
    x32 = x_Bd.astype(jnp.float32)
    partial = (x32 * w_d) @ w_do
    sum_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
    both = allreduce(jnp.concatenate([partial, sum_sq], axis=-1), axis, schedule, groups)
    return both[:, :-1] * jax.lax.rsqrt(both[:, -1:] / true_dim + eps)
