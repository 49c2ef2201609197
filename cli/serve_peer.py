"""`wafer serve-decode-peer`: process 1..N-1 of a `wafer serve` decode mesh that spans processes.

The server's decode worker is process 0 (`wafer serve --coordinator HOST:PORT --num-processes N
--process-id 0`); each peer joins the same mesh, takes the batch's settings (slots, max length,
schedule) from the server, and replays every operation of the decode worker on its own share of
the cores (serve/decode_peers.py) until the server's decode worker stops or goes away.
"""

from __future__ import annotations

import argparse
import os
import sys

from cli.flags import add_dtype_arg, add_model_args, int_at_least, join_processes, positive_int, progress
from mesh.errors import WaferError

EXIT_FAILED = 2  # the exit code of every WaferError (cli/main.py)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_dtype_arg(p)
    from mesh.distributed import INIT_TIMEOUT_S

    p.add_argument("--decode-mesh", default="2x2", help="the server's --decode-mesh (RxC; default 2x2)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="the server's --coordinator (its decode worker, process 0, listens there)")
    p.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                   help="processes in the decode mesh; each brings cores/N devices")
    p.add_argument("--process-id", type=int_at_least(1, "1..N-1 (process 0 is the server's decode worker)"),
                   default=None, metavar="I", help="this process, 1..N-1")
    p.add_argument("--coordinator-timeout", type=positive_int, default=INIT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long to wait for the server's decode worker and the other peers (default "
                        f"{INIT_TIMEOUT_S})")


def run(args) -> int:
    from mesh.executors import Executor, Grid
    from model.load import resolve_source

    if args.coordinator is None:
        raise WaferError("serve-decode-peer needs --coordinator HOST:PORT, --num-processes and --process-id")
    grid = Grid.parse(args.decode_mesh)
    resolve_source(args.model, args.checkpoint)  # a missing checkpoint fails before the mesh waits on us
    join_processes(args, grid, Executor.DEVICES)
    # A peer started again compiles the same programs again, as a restarted decode worker does:
    # the same persistent cache (serve/worker_process.py) turns that into loading.
    import jax

    from model.load import cache_dir, load_model
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))
    from serve.decode_peers import follow
    from serve.workers import decode_batch

    try:
        follow(args.process_id, args.coordinator, grid,
               lambda: load_model(args.model, args.checkpoint, dtype=args.dtype),
               decode_batch, progress)
    except WaferError as e:
        # The decode worker is gone: JAX's exit handler would wait for it at the shutdown barrier
        # (30 s) before this peer can be started again for the next decode worker. Leave now.
        print(f"wafer: error: {e}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)
    progress(f"process {args.process_id}: the server's decode worker closed the mesh")
    return 0
