"""Rotary position embeddings: plain and Llama-3 scaled frequencies, HF's half-split layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, llama3_scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [H/2], float32, computed the way HF transformers computes them.

    Args:
      head_dim: H.
      theta: rotary base.
      llama3_scaling: None, or dict(factor, low_freq_factor, high_freq_factor,
        original_max_pos) for Llama-3.1 style frequency scaling.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # torch's `float ** float32 tensor` rounds the double-precision power once to float32.
    powers = (float(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.reciprocal(powers)
    if llama3_scaling is None:
        return inv_freq
    factor = llama3_scaling["factor"]
    low, high = llama3_scaling["low_freq_factor"], llama3_scaling["high_freq_factor"]
    old_len = llama3_scaling["original_max_pos"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    # torch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar`; doing the same keeps
    # every frequency bit-identical to HF's (a plain division differs in the last ulp).
    wavelen = np.reciprocal(inv_freq) * np.float32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.reciprocal(wavelen) * np.float32(old_len) - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(pos: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [..., H] for integer positions `pos` [...]."""
    angles = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_ref(x_H: jax.Array, cos_H: jax.Array, sin_H: jax.Array) -> jax.Array:
    """Rotate `x` [..., H] by the angles whose cos/sin [..., H] broadcast against it.

    HF's layout: the first half of H pairs with the second half (`rotate_half`), not
    interleaved pairs as in llama.cpp (the GGUF loader undoes llama.cpp's row permutation).
    """
    half = x_H.shape[-1] // 2
    rotated = jnp.concatenate([-x_H[..., half:], x_H[..., :half]], axis=-1)
    # The tables are float32; a 16-bit x is rotated in its own dtype, as HF does (`cos.to(x.dtype)`).
    return x_H * cos_H.astype(x_H.dtype) + rotated * sin_H.astype(x_H.dtype)
