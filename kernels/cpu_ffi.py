"""The CPU kernels' library (gemv_cpu.cc, decode_attention_cpu.cc, cpu_common.h): built, loaded
and registered as XLA FFI targets once per process.

Build: compiled on first use with the system's C++ compiler (`CXX`, default g++) into a cache
folder (`$WAFER_CACHE_DIR/kernels`, default ~/.cache/wafer/kernels), keyed by a hash of the
sources, the flags, the compiler and jaxlib, so a fresh clone needs no network and no setup step.
The vector code is compiled for AVX2 + FMA through target attributes, never `-march=native`, and
runs only where the CPU reports both. When the compiler is missing, the build fails or the CPU
lacks AVX2/FMA, `available()` is False, the callers use XLA's ops and one warning says why;
`WAFER_CPU_KERNELS=xla` asks for XLA's ops (A/B measurements); `WAFER_CPU_KERNELS=panels` asks
the single-device Generator to pack its block weights into column panels (`panels_requested`).
"""

from __future__ import annotations

import ctypes
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

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv_cpu.cc", HERE / "decode_attention_cpu.cc")
HEADERS = (HERE / "cpu_common.h",)
# FFI target name -> the library's handler symbol.
TARGETS = {"wafer_gemv_f32": "WaferGemvF32", "wafer_gemv_panels_f32": "WaferGemvPanelsF32",
           "wafer_decode_attention_f32": "WaferDecodeAttentionF32"}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")


def default_threads() -> int:
    """Threads per kernel call: the CPUs this process may run on (a GEMV saturates memory well
    before 8)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def cache_dir() -> Path:
    """Where built kernels are kept: `kernels/` in the project's cache folder (model/load.py)."""
    return Path(os.environ.get("WAFER_CACHE_DIR") or Path.home() / ".cache" / "wafer") / "kernels"


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def build_library() -> Path:
    """The compiled library, built now unless the cache already holds this version.

    Raises OSError / subprocess errors when there is no compiler or the build fails.
    """
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler {cxx!r} on PATH")
    include = jax.ffi.include_dir()
    parts = [*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(FLAGS).encode(), _compiler_id(cxx).encode(),
             importlib.metadata.version("jaxlib").encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                       timeout=300, check=True)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def panels_requested() -> bool:
    """Whether `WAFER_CPU_KERNELS=panels` asks for block weights packed for the panel kernel
    (model/generate.py; off by default: the packed copy is held beside the caller's weights)."""
    return os.environ.get("WAFER_CPU_KERNELS", "").lower() == "panels"


def unavailable_reason() -> str | None:
    """Build, load and register the kernels; None when that worked, else why it did not."""
    if os.environ.get("WAFER_CPU_KERNELS", "").lower() == "xla":
        return "WAFER_CPU_KERNELS=xla"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64, this machine is {platform.machine()}"
    try:
        lib = ctypes.CDLL(str(build_library()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()
        return f"build failed: {detail.splitlines()[-1] if detail else type(e).__name__}"
    if not lib.wafer_cpu_kernels_supported():
        return "this CPU lacks AVX2 or FMA"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


_why_off: str | None = None  # available()'s reason, for why_off()


def why_off() -> str | None:
    """Why `available()` is False, as `unavailable_reason()` said when it decided (None: usable)."""
    available()
    return _why_off


@functools.cache
def available() -> bool:
    """Whether the kernels are usable in this process (decided once; when they are not, one
    warning says why, except when WAFER_CPU_KERNELS=xla asked for XLA's ops)."""
    global _why_off
    reason = _why_off = unavailable_reason()
    if reason is not None and reason != "WAFER_CPU_KERNELS=xla":
        log.warning("CPU kernels off, XLA's ops used instead: %s", reason)
    return reason is None
