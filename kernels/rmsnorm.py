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


def rmsnorm_mesh(x_Bd: jax.Array, w_d: jax.Array, eps: float, true_dim: int, axis: str,
                 schedule, groups: int | None = None) -> jax.Array:
    """Per-core RMSNorm of a vector split over mesh axis `axis` (x[D_axis]).

    The local sum of squares is all-reduced along `axis`; the mean divides by the true width
    (`true_dim`), so zero padding of D never changes the result.

    Args:
      x_Bd: [B, d] this core's slice of the activations.
      w_d: [d] the matching slice of the scale (zero in padding).
    """
    x32 = x_Bd.astype(jnp.float32)
    sum_sq = allreduce(jnp.sum(x32 * x32, axis=-1, keepdims=True), axis, schedule, groups)
    return w_d * (x32 * jax.lax.rsqrt(sum_sq / true_dim + eps)).astype(x_Bd.dtype)
