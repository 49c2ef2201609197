"""The sending side of a KV handoff between processes, launched by tests/test_kv_transport.py.

    python tests/helpers/workers/kv_sender.py MODE MODEL SEED PREFILL_GRID PORT

Prefills tests.helpers.kv_fixtures.PROMPT on a tiny random-weight model (or SmolLM2) and sends its
cache to a receiver on 127.0.0.1:PORT. MODE: tcp (the whole stream), tcp-half (the header and half
the stream, then a disconnect), tcp-stall (half the stream, then silence until killed), jax (JAX
transfer). Exits non-zero on any error, so a failure is never silent.
"""

from __future__ import annotations

import os
import socket
import sys
import time

# The repository root (tests/helpers/workers/ is three folders below it) first on the path:
# this tree's modules and tests.helpers, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from mesh.devices import ensure_cpu_devices

ensure_cpu_devices(4)


def main(mode: str, model: str, seed: str, prefill_grid: str, port: str) -> None:
    from kvcache.format import serialize_kv
    from kvcache.jax_transfer import send_kv_transfer
    from kvcache.transport import LOOPBACK, send_kv
    from mesh.executors import Grid
    from tests.helpers.kv_fixtures import export, tiny

    if model == "smollm2-135m":
        from model.load import load_model
        loaded = load_model(model)
        params, config = loaded.params, loaded.config
    else:
        params, config = tiny(model, int(seed))
    seq, header = export(params, config, prefill_grid=Grid.parse(prefill_grid))
    if mode == "tcp":
        send_kv(seq, header, int(port))
    elif mode == "jax":
        if not send_kv_transfer(seq, header, int(port)):
            raise SystemExit("the receiver refused the JAX transfer")
    elif mode in ("tcp-half", "tcp-stall"):
        data = serialize_kv(seq, header)
        with socket.create_connection((LOOPBACK, int(port)), timeout=30) as sock:
            sock.sendall(data[: len(data) // 2])
            if mode == "tcp-stall":
                time.sleep(600)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
