"""How a worker process starts: the entry point the engine spawns (`worker_main`), which pins the
process to its CPUs and sets up its JAX devices before anything starts JAX, then runs the worker
of its role until told to stop or its pipe closes.

This module's top level imports nothing heavy: `multiprocessing`'s spawn imports it in the fresh
child before `worker_main` runs, and threads started before the CPU pinning (numpy's BLAS pool,
XLA's) would keep the parent's CPUs. The spec travels pickled, as bytes, for the same reason.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import traceback

from serve.worker_spec import Role, WorkerSpec

# Settings a worker's JAX must not inherit from its parent: each worker sets its own device count.
INHERITED_JAX_SETTINGS = ("JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
                          "JAX_LOCAL_DEVICE_IDS", "JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "PJRT_NPROC")


def name_process(name: str) -> None:
    """Set the name `ps`, `top` and /proc/PID/comm show (Linux; 15 characters at most), so an
    operator, or a test that kills one worker, tells the workers apart: their command lines are
    multiprocessing's, the same for every role."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux: the name is only a convenience


def pin_fresh_process(cpus: tuple[int, ...]) -> None:
    """Pin this fresh process to `cpus` (none: leave it) and clear the JAX settings a worker must
    not inherit; before anything starts JAX (bench/serve_costs.py's measuring processes use it too)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    for name in INHERITED_JAX_SETTINGS:
        os.environ.pop(name, None)
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                       if not f.startswith("--xla_force_host_platform_device_count"))
    # The meshes are emulated CPU devices unless the operator chose a platform.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def worker_main(cpus: tuple[int, ...], payload: bytes, conn) -> None:
    """The worker process: pin, set up devices, load, report Ready, serve commands until Shutdown
    or until the engine's end of the pipe closes (the engine is gone)."""
    pin_fresh_process(cpus)
    spec: WorkerSpec = pickle.loads(payload)
    name_process(f"wafer-{spec.role.value}")
    # The worker's progress notes (its precompilation) go to the server's stderr, named.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s wafer-{spec.role.value} %(message)s"))
    logging.getLogger("serve.workers").addHandler(handler)
    logging.getLogger("serve.workers").setLevel(logging.INFO)
    distributed = spec.options.distributed
    if spec.role is Role.DECODE and distributed is not None:
        # Process 0 of a decode mesh spanning processes: it serves the coordinator, and waits for
        # the peers (`wafer serve-decode-peer`) to join before JAX starts here.
        from mesh.distributed import init_cpu_process
        init_cpu_process(distributed.coordinator, distributed.num_processes, distributed.process_id, spec.devices,
                         distributed.timeout_s)
    else:
        from mesh.devices import ensure_cpu_devices
        ensure_cpu_devices(spec.devices)
    # A restarted worker compiles the same programs again: XLA's persistent cache turns its ~20 s
    # of compilation (SmolLM2-sized meshes on 2 busy CPUs) into a few seconds of loading.
    import jax

    from model.load import cache_dir
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))

    from serve.workers import PRECOMPILE_THREAD, run_worker
    try:
        run_worker(spec, conn)
        if any(t.name == PRECOMPILE_THREAD and t.is_alive() for t in threading.enumerate()):
            # Still compiling a program: the interpreter's exit would pull XLA down under it
            # ("terminate called ..."); nothing is left to finish, so leave at once.
            conn.close()
            sys.stderr.flush()
            os._exit(0)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the engine went away: nothing left to report to
    except BaseException:
        if distributed is None or spec.role is not Role.DECODE:
            raise
        # A mesh that lost a process: JAX's exit handler would wait for it at the shutdown barrier
        # (mesh.distributed.SHUTDOWN_TIMEOUT_S) while the engine waits to reap this process, so
        # leave at once, with the report multiprocessing would have written.
        conn.close()
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        conn.close()
