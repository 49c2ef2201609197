"""A multi-threaded f32 GEMV (and small-batch GEMM) for decode on CPU: an XLA FFI target.

Why: XLA's CPU dot streams the decode step's weights at about half the machine's copy bandwidth
for these shapes (a [1, 576] x [576, 3072] product is too small for its threading, whatever the
layout or the XLA_FLAGS tried: docs/decode/gemv_micro.py). The kernel in `gemv_cpu.cc` splits W
into one contiguous block per thread, so each thread reads memory sequentially, and computes
every row of x against each load of W (batch 8 streams W once).

    y[M, N] = x[M, K] @ W      with W stored [K, N] (`WLayout.KN`: the block weights) or
                               [N, K] (`WLayout.NK`: the LM head, i.e. the embedding [V, D]).

Build: compiled on first use with the system's C++ compiler (`CXX`, default g++) into a cache
folder (`$WAFER_CACHE_DIR/kernels`, default ~/.cache/wafer/kernels), keyed by a hash of the
source, the flags, the compiler and jaxlib, so a fresh clone needs no network and no setup step.
The vector code is compiled for AVX2 + FMA through target attributes, never `-march=native`, and
runs only where the CPU reports both. When the compiler is missing, the build fails, the CPU
lacks AVX2/FMA, `matmul_f32` is XLA's dot and one warning says why; `WAFER_GEMV=xla` asks for
XLA's dot (A/B measurements).
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv_cpu.cc")
TARGET = "wafer_gemv_f32"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
# x rows up to which the kernel replaces XLA's dot (decode batches); longer inputs (prefill) are
# matrix products that XLA's GEMM does well.
MAX_ROWS = 16


class WLayout(enum.Enum):
    KN = "kn"  # W[K, N], row-major
    NK = "nk"  # W[N, K], row-major (y = x @ W.T)


def default_threads() -> int:
    """Threads per GEMV: the CPUs this process may run on (a GEMV saturates memory well before 8)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def cache_dir() -> Path:
    """Where built kernels are kept: `kernels/` in the project's cache folder (model/load.py)."""
    return Path(os.environ.get("WAFER_CACHE_DIR") or Path.home() / ".cache" / "wafer") / "kernels"


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def build_library() -> Path:
    """The compiled kernel library, built now unless the cache already holds this version.

    Raises OSError / subprocess errors when there is no compiler or the build fails.
    """
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler {cxx!r} on PATH")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_id(cxx).encode(),
                                     importlib.metadata.version("jaxlib").encode()])).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"gemv_cpu-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp], capture_output=True, text=True,
                       timeout=300, check=True)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def unavailable_reason() -> str | None:
    """Build, load and register the kernel; None when that worked, else why it did not."""
    if os.environ.get("WAFER_GEMV", "").lower() == "xla":
        return "WAFER_GEMV=xla"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64, this machine is {platform.machine()}"
    try:
        lib = ctypes.CDLL(str(build_library()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()
        return f"build failed: {detail.splitlines()[-1] if detail else type(e).__name__}"
    if not lib.wafer_gemv_cpu_supported():
        return "this CPU lacks AVX2 or FMA"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.WaferGemvF32), platform="cpu")
    return None


@functools.cache
def available() -> bool:
    """Whether the kernel is usable in this process (decided once; when it is not, one warning
    says why, except when WAFER_GEMV=xla asked for XLA's dot)."""
    reason = unavailable_reason()
    if reason is not None and reason != "WAFER_GEMV=xla":
        log.warning("CPU GEMV kernel off, XLA's dot used instead: %s", reason)
    return reason is None


def gemv(x_MK: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN, threads: int | None = None) -> jax.Array:
    """y[M, N] = x[M, K] @ W through the kernel (CPU only; call `available()` first).

    Args:
      x_MK: [M, K] float32.
      w: [K, N] (WLayout.KN) or [N, K] (WLayout.NK) float32, row-major.
      threads: threads to split W over (default `default_threads()`).
    """
    M, K = x_MK.shape
    N = w.shape[0] if layout is WLayout.NK else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method="sequential")
    return call(x_MK, w, w_nk=layout is WLayout.NK, threads=np.int64(threads or default_threads()))


def gemv_ref(x_MK: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN) -> jax.Array:
    """The plain-jnp product `gemv` computes."""
    w_KN = w.T if layout is WLayout.NK else w
    return jnp.matmul(x_MK, w_KN, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def matmul_f32(x: jax.Array, w: jax.Array, layout: WLayout = WLayout.KN) -> jax.Array:
    """x[..., K] @ W in float32: the kernel on CPU for f32 operands of at most MAX_ROWS rows,
    XLA's dot otherwise (GPU, 16-bit weights, prefill-sized inputs, kernel unavailable)."""
    w_KN = w.T if layout is WLayout.NK else w
    xla = lambda x, w_KN: jnp.matmul(x, w_KN, preferred_element_type=jnp.float32)
    rows = int(np.prod(x.shape[:-1]))
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or rows > MAX_ROWS or not available():
        return xla(x, w_KN)

    def cpu(x, w):
        y = gemv(x.reshape(rows, x.shape[-1]), w, layout)
        return y.reshape(x.shape[:-1] + y.shape[-1:])
    return jax.lax.platform_dependent(x, w, cpu=cpu, default=lambda x, w: xla(x, w.T if layout is WLayout.NK else w))
