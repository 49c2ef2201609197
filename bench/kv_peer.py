"""The receiving process of `wafer bench kv`'s cross-process measurements.

    python -m bench.kv_peer {tcp|jax}

Listens on 127.0.0.1, prints {"port": P} on one line, accepts one sender, receives its whole
stream (every frame checksum-verified; for jax, pulled through `jax.experimental.transfer`),
then prints {"seconds": S, "bytes": B}: S from the accepted connection to the last verified frame,
B the cache bytes received.
"""

from __future__ import annotations

import json
import sys
import time

from kvcache.format import KVReader
from kvcache.jax_transfer import ACK_LANDED, TransferReader
from kvcache.transport import KVListener

ACCEPT_TIMEOUT_S = 120


def main(mode: str) -> None:
    with KVListener() as listener:
        print(json.dumps({"port": listener.port}), flush=True)
        with listener.accept(ACCEPT_TIMEOUT_S) as source:
            t0 = time.perf_counter()
            reader = KVReader(source) if mode == "tcp" else TransferReader(source)
            received = sum(f.k_KSH.nbytes + f.v_KSH.nbytes for f in reader.frames())
            seconds = time.perf_counter() - t0
            if mode == "jax":
                source.sock.sendall(ACK_LANDED)
    print(json.dumps({"seconds": seconds, "bytes": received}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
