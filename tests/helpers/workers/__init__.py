"""Worker scripts that tests launch as separate processes, by path, with cwd=REPO.

Each script puts REPO first on sys.path itself (so this tree's modules win over an installed
copy), then imports the project and `tests.helpers` like a test does.
"""

from __future__ import annotations

import os

WORKERS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(WORKERS_DIR)))
KV_SENDER = os.path.join(WORKERS_DIR, "kv_sender.py")
MULTIPROCESS_DECODE = os.path.join(WORKERS_DIR, "multiprocess_decode.py")
FAKE_SERVE = os.path.join(WORKERS_DIR, "fake_serve.py")


def worker_env() -> dict[str, str]:
    """This environment, minus settings that would fight the workers' own device setup."""
    env = dict(os.environ)
    # Each worker sets its device count itself (mesh.distributed); an inherited count, or a
    # coordinator picked up from the environment, would build a different mesh.
    for name in ("JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
                 "JAX_LOCAL_DEVICE_IDS", "JAX_PROCESS_ID", "JAX_NUM_PROCESSES"):
        env.pop(name, None)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    return env
