"""`wafer serve`: the OpenAI-compatible server over a prefill worker and a wafer decode worker
(or one integrated worker), until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os

from cli.flags import add_dtype_arg, add_model_args, int_at_least, positive_int, progress
from mesh.errors import WaferError

MAX_PORT = 65535


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serve.events import Mode, SchedulerConfig
    from serve.options import Distributed, EngineOptions

    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the preset's or checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, as vLLM's)")
    p.add_argument("--port", type=int_at_least(0, "a port number (0: any free port)"), default=8000)
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.DISAGGREGATED.value,
                   help="disaggregated: a prefill worker and a decode worker; integrated: one worker does both")
    p.add_argument("--prefill-mesh", default="1x1", help="the prefill worker's RxC device mesh")
    p.add_argument("--decode-mesh", default="2x2", help="the decode worker's RxC wafer core mesh")
    p.add_argument("--executor", choices=["devices", "vcores"], default="devices",
                   help="how the decode mesh's cores run: one JAX device each, or virtual cores on one device")
    p.add_argument("--schedule", choices=["auto", "psum", "ring", "ktree"], default="auto",
                   help="all-reduce schedule (auto: the fastest on the decode mesh, measured when its worker starts)")
    p.add_argument("--groups", type=positive_int, default=None, help="K-tree groups per mesh axis (default ~sqrt)")
    p.add_argument("--slots", type=positive_int, default=SchedulerConfig.slots, help="decode batch size")
    p.add_argument("--max-len", type=int_at_least(2, "at least 2"), default=EngineOptions.max_len,
                   help="positions per slot: prompt and output tokens together")
    p.add_argument("--sram-budget", default=None,
                   help="bytes per decode core the SRAM planner holds the layout to, e.g. 48MiB (default: no limit)")
    p.add_argument("--max-waiting", type=positive_int, default=SchedulerConfig.max_waiting,
                   help="waiting queue bound; requests beyond it get 429")
    p.add_argument("--prefill-cpus", default=None, metavar="LIST",
                   help="CPUs of the prefill worker, e.g. 0-3,6 (default: the machine split between workers)")
    p.add_argument("--decode-cpus", default=None, metavar="LIST", help="CPUs of the decode worker")
    p.add_argument("--transport", choices=["tcp", "jax"], default="tcp", help="the KV handoff's transport")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="decode mesh over several processes: the jax.distributed coordinator")
    p.add_argument("--num-processes", type=positive_int, default=None, help="processes of the decode mesh")
    p.add_argument("--process-id", type=int_at_least(0, "non-negative"), default=None,
                   help="this process's index: 0 (the decode worker); the others run wafer serve-decode-peer")
    p.add_argument("--coordinator-timeout", type=positive_int, default=Distributed.timeout_s, metavar="SECONDS",
                   help="how long the decode worker waits for its peers to join (default %(default)s)")


def parse_cpus(text: str, flag: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6); every CPU must be one this process may run on."""
    cpus: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise WaferError(f"{flag} {text!r}: expected CPU numbers and ranges such as 0-3,6") from None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    missing = sorted(cpus - allowed)
    if missing:
        raise WaferError(f"{flag} {text!r}: CPU {missing[0]} is not available here "
                         f"(this process may use {format_cpus(allowed)})")
    return tuple(sorted(cpus))


def format_cpus(cpus) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_distributed(args):
    """The decode mesh across processes: all three flags or none."""
    from serve.options import Distributed

    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise WaferError(f"{', '.join(missing)} missing: a multi-process decode mesh needs --coordinator, "
                         "--num-processes and --process-id")
    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise WaferError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    if args.process_id >= args.num_processes:
        raise WaferError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    return Distributed(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout)


def options_from_args(args):
    """Every flag checked and parsed into the engine's `EngineOptions`; nothing started yet."""
    from kernels.allreduce import Schedule
    from mesh.executors import Executor, Grid
    from mesh.wafer import parse_bytes
    from serve.events import Mode, SchedulerConfig
    from serve.options import EngineOptions

    if args.port > MAX_PORT:
        raise WaferError(f"--port {args.port}: must be at most {MAX_PORT}")
    schedule = None if args.schedule == "auto" else Schedule(args.schedule)
    if args.groups is not None and schedule not in (None, Schedule.KTREE):
        raise WaferError("--groups needs --schedule ktree or auto")
    grids = {}
    for flag, text in (("--prefill-mesh", args.prefill_mesh), ("--decode-mesh", args.decode_mesh)):
        try:
            grids[flag] = Grid.parse(text)
        except WaferError as e:
            raise WaferError(f"{flag}: {e}") from None
    mode = Mode(args.mode)
    budget = parse_bytes(args.sram_budget) if args.sram_budget is not None else None
    if budget is not None and budget <= 0:
        raise WaferError(f"--sram-budget {args.sram_budget!r}: must be positive")
    return EngineOptions(
        model=args.model, checkpoint=args.checkpoint, dtype=args.dtype, mode=mode,
        prefill_grid=grids["--prefill-mesh"], decode_grid=grids["--decode-mesh"],
        executor=Executor(args.executor), schedule=schedule, groups=args.groups, max_len=args.max_len,
        sram_budget=budget,
        transport=args.transport,
        prefill_cpus=parse_cpus(args.prefill_cpus, "--prefill-cpus") if args.prefill_cpus is not None else None,
        decode_cpus=parse_cpus(args.decode_cpus, "--decode-cpus") if args.decode_cpus is not None else None,
        distributed=parse_distributed(args),
        scheduler=SchedulerConfig(mode=mode, slots=args.slots, max_waiting=args.max_waiting),
    )


def run(args) -> int:
    from model.load import load_tokenizer
    from serve.metrics import ServeMetrics
    from serve.server import serve

    options = options_from_args(args)
    tokenizer = load_tokenizer(args.model, args.checkpoint)
    if tokenizer is None:
        raise WaferError(f"{args.checkpoint} ships no tokenizer (tokenizer.json); the server needs one")
    # Imported here: the engine lives in its own module and starts worker processes.
    from serve.engine import WorkerEngine

    metrics = ServeMetrics()
    engine = WorkerEngine(options, metrics)
    progress(f"wafer serve: starting the {options.mode.value} engine (decode mesh "
             f"{options.decode_grid.rows}x{options.decode_grid.cols}, {options.scheduler.slots} slots)")
    asyncio.run(serve(engine, tokenizer, metrics, args.host, args.port, model_name=args.served_model_name,
                      on_listening=lambda url: progress(f"wafer serve: listening on {url} (OpenAI API at {url}/v1)")))
    progress("wafer serve: stopped")
    return 0
