"""RMSNorm. The single-device reference; the distributed version joins it with the mesh."""

import jax
import jax.numpy as jnp


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
