"""CPU-device emulation: R×C meshes of real JAX devices on a machine with one CPU.

Two settings must be in place before JAX creates its CPU backend, and both are made here so no
caller has to remember them:
- the device count (`jax_num_cpu_devices`);
- the size of XLA's CPU thread pool (`PJRT_NPROC`). XLA's CPU collectives block a pool thread per
  participating device; with fewer threads than work in flight they deadlock ("This thread has
  been waiting ... may be stuck", then an abort). On a 2-core machine a 16-device mesh with a
  4096-wide GEMV hung; a pool of at least twice the device count fixed every case we tried.
"""

from __future__ import annotations

import os

from mesh.errors import WaferError

# Threads per emulated device in XLA's CPU pool (see the module docstring).
THREADS_PER_DEVICE = 2


def backend_started() -> bool:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def ensure_cpu_devices(n: int) -> None:
    """Make at least `n` CPU devices available to this process.

    Call before anything touches a JAX device. Raises WaferError if JAX already started with
    fewer devices (the count cannot change after the backend exists).
    """
    import jax

    if n < 1:
        raise WaferError(f"device count must be positive, got {n}")
    if backend_started():
        have = len(jax.devices("cpu"))
        if have < n:
            raise WaferError(
                f"JAX already started with {have} CPU devices; {n} are needed. Set the device count "
                f"before any JAX computation (mesh.devices.ensure_cpu_devices), or run in a new process")
        return
    threads = max(THREADS_PER_DEVICE * n, os.cpu_count() or 1)
    current = int(os.environ.get("PJRT_NPROC", "0") or 0)
    os.environ["PJRT_NPROC"] = str(max(current, threads))
    configured = jax.config.jax_num_cpu_devices
    jax.config.update("jax_num_cpu_devices", max(n, configured if configured > 0 else 1))

