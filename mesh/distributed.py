"""Start one process of a decode mesh that spans several processes (`jax.distributed`, CPU).

Every process emulates `local_devices` CPU devices; after `init_cpu_process`, `jax.devices()`
lists the devices of all processes (process 0's first), so `make_core_mesh` lays a grid over
them as over one machine. Cross-process collectives on CPU go through gloo over TCP.

Everything here must happen before JAX creates its CPU backend: the device count, the
collectives implementation and the distributed client are all read when the backend starts.
"""

from __future__ import annotations

import socket
import time

from mesh.devices import backend_started, ensure_cpu_devices
from mesh.errors import WaferError

# Seconds a process waits for the others to join; a peer silent this long is declared dead.
# Bounded so a crashed peer fails the others within a minute instead of hanging them.
INIT_TIMEOUT_S = 60
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30
# Topology exchange when the CPU backend starts (whole minutes; global must exceed local).
LOCAL_TOPOLOGY_TIMEOUT_MIN = 1
GLOBAL_TOPOLOGY_TIMEOUT_MIN = 2


def split_address(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host:
        raise WaferError(f"coordinator {coordinator!r}: expected HOST:PORT such as 127.0.0.1:12345")
    try:
        port_n = int(port)
    except ValueError:
        raise WaferError(f"coordinator {coordinator!r}: port {port!r} is not a number") from None
    if not 0 < port_n < 65536:
        raise WaferError(f"coordinator {coordinator!r}: port {port_n} is outside 1..65535")
    return host.strip("[]"), port_n


def _check_can_listen(coordinator: str) -> None:
    """Process 0 serves the coordinator: refuse an address it cannot bind, before JAX tries (JAX
    aborts the process instead of raising)."""
    host, port = split_address(coordinator)
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise WaferError(f"coordinator {coordinator}: process 0 cannot listen there ({e.strerror or e})") from None


def _wait_for_coordinator(coordinator: str, timeout_s: float) -> None:
    """Wait until something listens at the coordinator's address. A process whose coordinator never
    answers then fails with a sentence, not JAX's abort (DEADLINE_EXCEEDED and a C++ stack)."""
    host, port = split_address(coordinator)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise WaferError(f"no coordinator answered at {coordinator} within {timeout_s:g} s: start process 0 "
                                 f"with the same --coordinator (it listens there)") from None
            time.sleep(0.2)


def check_process_args(coordinator: str, num_processes: int, process_id: int) -> None:
    """Refuse a malformed coordinator address, process count or process id (nothing started)."""
    split_address(coordinator)
    if num_processes < 1:
        raise WaferError(f"process count must be positive, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise WaferError(f"process id {process_id} is outside 0..{num_processes - 1}")


def init_cpu_process(coordinator: str, num_processes: int, process_id: int, local_devices: int,
                     timeout_s: int = INIT_TIMEOUT_S) -> None:
    """Join this process to a multi-process CPU mesh; call before anything touches a JAX device.

    Args:
      coordinator: HOST:PORT of process 0's coordinator service (e.g. "127.0.0.1:12345"). The
        coordinator binds that address only, not every interface.
      num_processes: processes in the mesh; process ids are 0 .. num_processes - 1.
      process_id: this process's id.
      local_devices: CPU devices this process emulates (the same in every process).
      timeout_s: seconds to wait for every process to join. Past it JAX aborts the process (a
        C++ check failure, DEADLINE_EXCEEDED), which no caller can catch; a process other than 0
        first waits up to this long for the coordinator to listen and fails with a WaferError.

    Raises:
      WaferError: a bad argument, or JAX already started in this process.
    """
    import jax

    check_process_args(coordinator, num_processes, process_id)
    if local_devices < 1:
        raise WaferError(f"local device count must be positive, got {local_devices}")
    if timeout_s < 1:
        raise WaferError(f"timeout must be at least 1 second, got {timeout_s}")
    if jax.distributed.is_initialized():
        raise WaferError("jax.distributed is already initialized in this process")
    if backend_started():
        raise WaferError("JAX already started in this process; join the mesh before any JAX computation, "
                         "or run in a new process")
    t0 = time.monotonic()
    if process_id == 0:
        _check_can_listen(coordinator)
    else:
        _wait_for_coordinator(coordinator, timeout_s)
    timeout_s = max(1, round(timeout_s - (time.monotonic() - t0)))
    ensure_cpu_devices(local_devices)
    # Exactly this many, not "at least" (a JAX_NUM_CPU_DEVICES in the environment may ask for
    # more): the global device list is process-major only if every process brings the same count.
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes", LOCAL_TOPOLOGY_TIMEOUT_MIN)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes", GLOBAL_TOPOLOGY_TIMEOUT_MIN)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        # Bind exactly the given address: by default the coordinator listens on every interface.
        coordinator_bind_address=coordinator,
        cluster_detection_method="deactivate", initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
