"""Decode attention on CPU over the visible prefix of the cache: an XLA FFI target
(`decode_attention_cpu.cc`, built by kernels/cpu_ffi.py).

Why: XLA's fused elementwise form (kernels/attention.py, `decode_attention_partial`) ran as YNNPACK
reductions at about 3 GB/s of cache on this CPU (7.3 ms of a ~26 ms SmolLM2 step in a profile:
docs/decode/step_profile.py, bench/RESULTS.md) and reads every position of the cache it is given; the kernel reads only the positions a token
may see, with the scores of one (sequence, KV head) pair kept in L1, and spreads the pairs over
the shared thread pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi
from kernels.attention import decode_attention_partial

TARGET = "wafer_decode_attention_f32"


def decode_attention_prefix_ref(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                                n_visible_B: jax.Array) -> jax.Array:
    """The reference: `decode_attention_partial` over positions [0, n_visible_B[b]), normalized."""
    visible_BS = jnp.arange(k_BKSH.shape[2], dtype=jnp.int32)[None, :] < n_visible_B[:, None]
    _, l, o = decode_attention_partial(q_BKGH, k_BKSH, v_BKSH, visible_BS)
    return o / l[..., None]


def decode_attention_prefix(q_BKGH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, n_visible_B: jax.Array,
                            threads: int | None = None) -> jax.Array:
    """Attention of one query token per sequence over the first n_visible_B[b] cache positions.

    Args:
      q_BKGH: [B, K, G, H] queries (rotated), G per KV head.
      k_BKSH, v_BKSH: [B, K, S, H] the cache (keys rotated).
      n_visible_B: [B] int32 positions each sequence sees (its own new token included), >= 1.
      threads: threads for the kernel (default `cpu_ffi.default_threads()`).

    Returns:
      [B, K, G, H] float32: the kernel on CPU for float32 caches with H a multiple of 32 (when
      the kernels are available), the reference otherwise.
    """
    H = q_BKGH.shape[-1]
    dtypes = {q_BKGH.dtype, k_BKSH.dtype, v_BKSH.dtype}
    if dtypes != {jnp.dtype(jnp.float32)} or H % 32 or not cpu_ffi.available():
        return decode_attention_prefix_ref(q_BKGH, k_BKSH, v_BKSH, n_visible_B)

    def cpu(q, k, v, n):
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
        return call(q, k, v, n.astype(jnp.int32), scale=np.float32(H ** -0.5),
                    threads=np.int64(threads or cpu_ffi.default_threads()))
    return jax.lax.platform_dependent(q_BKGH, k_BKSH, v_BKSH, n_visible_B, cpu=cpu,
                                      default=decode_attention_prefix_ref)
