"""The KV cache the model writes: one [B, K, S, H] array per layer for keys and for values.

Per-layer arrays (not one stacked [L, ...] array) for the same reason as the weights: XLA on
CPU streams separate arrays faster than slices of a stacked one. Positions and lengths are not
part of the cache; the decoder carries them as arrays of their own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k_LBKSH: tuple[jax.Array, ...]  # L arrays of [B, K, S, H]
    v_LBKSH: tuple[jax.Array, ...]

    @property
    def batch(self) -> int:
        return self.k_LBKSH[0].shape[0]

    @property
    def max_len(self) -> int:  # S
        return self.k_LBKSH[0].shape[2]

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k_LBKSH + self.v_LBKSH)


def empty_cache(n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                dtype=jnp.float32) -> KVCache:
    shape = (batch, n_kv_heads, max_len, head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)))


def write_kv(cache_BKSH: jax.Array, new_BKTH: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write T new positions for each sequence b at `start_B[b]`.

    One `dynamic_update_slice` per sequence (B is small and static): a vmapped update would
    lower to a scatter, which XLA on CPU ran by copying the whole cache of every layer each step.
    The caller guarantees start + T <= S: `dynamic_update_slice` clamps an out-of-range start,
    which would silently shift the write.
    """
    new_BKTH = new_BKTH.astype(cache_BKSH.dtype)
    for b in range(cache_BKSH.shape[0]):
        cache_BKSH = jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH[b:b + 1], (b, 0, start_B[b], 0))
    return cache_BKSH
