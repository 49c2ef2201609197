"""A multi-threaded f32 GEMV (and small-batch GEMM) for decode on CPU: an XLA FFI target
(`gemv_cpu.cc`, built by kernels/cpu_ffi.py).

Why: XLA's CPU dot streams the decode step's weights well below the machine's copy bandwidth
for these shapes (docs/decode/gemv_micro.py). The kernel splits W into contiguous chunks that the
calling thread and the pool's workers claim one at a time, so each thread reads memory
sequentially and a descheduled worker never stalls the call; every row of x meets each load of
W (batch 8 streams W once); chunk partials are summed in chunk order, so results do not depend on
thread timing.

    y[M, N] = x[M, K] @ W      with W stored [K, N] (`WLayout.KN`: the block weights) or
                               [N, K] (`WLayout.NK`: the LM head, i.e. the embedding [V, D]).

Batch > 1 (several rows of x) wants W packed into column panels (`pack_panels`, `gemv_panels`):
[K, N] read with the accumulators in memory is compute bound there, and read in [K, 8] tiles of
a [K, N] array it waits on strided loads; packed, each thread streams whole panels sequentially
with R rows x C panels of accumulators in registers (bench/RESULTS.md, "2026-11-30 night").
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi

TARGET = "wafer_gemv_f32"
PANELS_TARGET = "wafer_gemv_panels_f32"
PANEL = 8  # columns of W in a panel (one AVX2 vector)
# x rows up to which the kernel replaces XLA's dot (decode batches); longer inputs (prefill) are
# matrix products that XLA's GEMM does well.
MAX_ROWS = 16


class WLayout(enum.Enum):
    KN = "kn"  # W[K, N], row-major
    NK = "nk"  # W[N, K], row-major (y = x @ W.T)


def gemv(x_MK: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN, threads: int | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W through the kernel (CPU only; call `cpu_ffi.available()` first).

    Args:
      x_MK: [M, K] float32.
      w: [K, N] (WLayout.KN) or [N, K] (WLayout.NK) float32, row-major.
      threads: threads to split W over (default `cpu_ffi.default_threads()`).
    """
    M, K = x_MK.shape
    N = w.shape[0] if layout is WLayout.NK else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method="sequential")
    return call(x_MK, w, w_nk=layout is WLayout.NK, threads=np.int64(threads or cpu_ffi.default_threads()))


def pack_panels(w_KN) -> np.ndarray:
    """W[K, N] as ceil(N / PANEL) contiguous column panels [P, K, PANEL] (the last one zero-padded):
    the layout `gemv_panels` streams. A numpy copy (made once, at load time)."""
    w = np.asarray(w_KN, np.float32)
    K, N = w.shape
    P = -(-N // PANEL)
    if P * PANEL != N:
        w = np.concatenate([w, np.zeros((K, P * PANEL - N), np.float32)], axis=1)
    return np.ascontiguousarray(w.reshape(K, P, PANEL).transpose(1, 0, 2))


def unpack_panels(w_PKC: jax.Array, n: int) -> jax.Array:
    """The [K, n] matrix that `pack_panels` packed (a transposing copy; XLA's dot on it)."""
    P, K, C = w_PKC.shape
    return w_PKC.transpose(1, 0, 2).reshape(K, P * C)[:, :n]


def gemv_panels(x_MK: jax.Array, w_PKC: jax.Array, n: int | None = None, threads: int | None = None) -> jax.Array:
    """y[M, n] = x[M, K] @ W through the panel kernel, W given as `pack_panels(W)` (CPU only; call
    `cpu_ffi.available()` first). `n`: W's columns (default all of the panels')."""
    M, _ = x_MK.shape
    P, _, C = w_PKC.shape
    n = P * C if n is None else n
    call = jax.ffi.ffi_call(PANELS_TARGET, jax.ShapeDtypeStruct((M, n), jnp.float32), vmap_method="sequential")
    return call(x_MK, w_PKC, threads=np.int64(threads or cpu_ffi.default_threads()))


def gemv_ref(x_MK: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN) -> jax.Array:
    """The plain-jnp product `gemv` computes."""
    w_KN = w.T if layout is WLayout.NK else w
    return jnp.matmul(x_MK, w_KN, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def matmul_f32(x: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN) -> jax.Array:
    """x[..., K] @ W in float32: the kernel on CPU for f32 operands of at most MAX_ROWS rows,
    XLA's dot otherwise (GPU, 16-bit weights, prefill-sized inputs, kernel unavailable).

    A 3-D `w` is W[K, N] packed by `pack_panels` with N a multiple of PANEL (`layout` ignored):
    the panel kernel, or XLA's dot on the unpacked copy."""
    if w.ndim == 3:
        n = w.shape[0] * w.shape[2]
        as_kn = lambda w: unpack_panels(w, n)
        kernel = gemv_panels
    else:
        as_kn = lambda w: w.T if layout is WLayout.NK else w
        kernel = lambda x_MK, w: gemv(x_MK, w, layout)
    xla = lambda x, w: jnp.matmul(x, as_kn(w), preferred_element_type=jnp.float32)
    rows = int(np.prod(x.shape[:-1]))
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or rows > MAX_ROWS or not cpu_ffi.available():
        return xla(x, w)

    def cpu(x, w):
        y = kernel(x.reshape(rows, x.shape[-1]), w)
        return y.reshape(x.shape[:-1] + y.shape[-1:])
    return jax.lax.platform_dependent(x, w, cpu=cpu, default=xla)
