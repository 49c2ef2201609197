"""The flags several `wafer` commands share, their validators, and progress lines on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from bench.mesh_setup import MeshSetup
from mesh.errors import WaferError

# A 1-minute load average above this many runnable processes per CPU (before we start) means
# other work shares the cores.
BUSY_LOAD_PER_CPU = 0.75


def int_at_least(minimum: int, what: str):
    """An argparse `type` for integers >= minimum (its message becomes the one-line CLI error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


positive_int = int_at_least(1, "a positive integer")


def int_list(text: str) -> tuple[int, ...]:
    """'32,128,256' -> (32, 128, 256): positive integers."""
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


# ------------------------------------------------------------------------------- model and prompt


def non_negative_float(text: str) -> float:
    """A finite number >= 0 for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A positive number (`inf` included) for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset name (default: smollm2-135m, the embedded model)")
    src.add_argument("--checkpoint", default=None, help="a .gguf file or an HF checkpoint folder")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype: the storage of weights, activations and KV caches (accumulation stays float32)."""
    from model.dtypes import DTYPES

    # The help names no backend: asking JAX for it here would start JAX before the mesh flags
    # could set the CPU device count.
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights, activations and KV caches in this dtype, accumulation in float32 "
                        "(default: float32 on CPU, bfloat16 on GPU)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise WaferError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise WaferError("--prompt-ids is empty")
    return ids


def check_prompt_args(args) -> None:
    """The prompt flags' own consistency, before anything is loaded."""
    if args.chat and args.prompt is None:
        raise WaferError("--chat needs --prompt text (token ids are used as they are)")


def prompt_ids_from_args(args, loaded) -> list[int]:
    """The prompt's token ids: --prompt encoded (chat-wrapped with --chat) or --prompt-ids."""
    if args.prompt is None:
        return parse_prompt_ids(args.prompt_ids)
    if loaded.tokenizer is None:
        raise WaferError(f"{loaded.source} ships no tokenizer; pass --prompt-ids")
    return loaded.tokenizer.encode_chat(args.prompt) if args.chat else loaded.tokenizer.encode(args.prompt)


# ------------------------------------------------------------------------------------------ mesh


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    """The decode mesh flags of `wafer generate`, `wafer kv import` and `wafer bench decode`."""
    p.add_argument("--mesh", default=None, help="decode on an RxC core mesh (e.g. 2x2); default: one device")
    p.add_argument("--executor", choices=["devices", "vcores"], default="devices",
                   help="devices: one JAX device per core; vcores: virtual cores on one device")
    p.add_argument("--schedule", choices=["auto", "psum", "ring", "ktree"], default="auto",
                   help="all-reduce schedule (auto: on devices the fastest from a short measurement on the mesh; "
                        "on vcores psum, one reduction where the others gather the whole grid)")
    p.add_argument("--groups", type=int, default=None, help="K-tree groups per mesh axis (default ~sqrt)")
    add_layout_arg(p)
    p.add_argument("--sram-budget", default=None,
                   help="per-core budget for the SRAM planner, e.g. 48KiB or 64MiB (default: no limit)")


def add_process_args(p: argparse.ArgumentParser) -> None:
    """The flags that spread the decode mesh over processes (`jax.distributed`; see the README)."""
    from mesh.distributed import INIT_TIMEOUT_S

    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="spread the --mesh over processes: process 0 listens at HOST:PORT, the others connect")
    p.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                   help="processes in the mesh (with --coordinator); each brings cores/N devices")
    p.add_argument("--process-id", type=int_at_least(0, "at least 0"), default=None, metavar="I",
                   help="this process, 0..N-1 (with --coordinator); only process 0 prints the answer")
    p.add_argument("--coordinator-timeout", type=positive_int, default=INIT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long to wait for the other processes to join (default {INIT_TIMEOUT_S})")


def join_processes(args, grid, executor) -> None:
    """Join the multi-process mesh the process flags ask for (before JAX starts); nothing without
    --coordinator."""
    from mesh.distributed import check_process_args, init_cpu_process
    from mesh.executors import Executor

    if args.coordinator is None:
        for flag in ("num_processes", "process_id"):
            if getattr(args, flag) is not None:
                raise WaferError(f"--{flag.replace('_', '-')} needs --coordinator")
        return
    if args.num_processes is None or args.process_id is None:
        raise WaferError("--coordinator needs --num-processes and --process-id")
    check_process_args(args.coordinator, args.num_processes, args.process_id)
    if grid is None:
        raise WaferError("--coordinator needs --mesh (the decode mesh the processes share)")
    if executor is not Executor.DEVICES:
        raise WaferError("--coordinator needs --executor devices (virtual cores live on one device)")
    if grid.cores % args.num_processes:
        raise WaferError(f"a {grid} mesh ({grid.cores} cores) does not split evenly over {args.num_processes} "
                         f"processes")
    progress(f"process {args.process_id} of {args.num_processes}: joining the mesh at {args.coordinator} "
             f"(waiting up to {args.coordinator_timeout} s for the others)")
    init_cpu_process(args.coordinator, args.num_processes, args.process_id, grid.cores // args.num_processes,
                     args.coordinator_timeout)


def add_layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=["auto", "heads", "full"], default="auto",
                   help="attention heads over the columns: heads = whole heads per column, full = each head's "
                        "dims split over a segment of columns, auto = the one with fewer bytes per core (default)")


def setup_mesh(args) -> MeshSetup | None:
    """Parse the mesh flags and emulate CPU devices before JAX starts (joining the processes of a
    mesh that spans several, when the command has the process flags); None without --mesh."""
    has_process_flags = hasattr(args, "coordinator")
    if args.mesh is None:
        for flag in ("groups", "sram_budget"):
            if getattr(args, flag) is not None:
                raise WaferError(f"--{flag.replace('_', '-')} needs --mesh")
        if args.layout != "auto":
            raise WaferError("--layout needs --mesh")
        if has_process_flags:
            join_processes(args, None, None)
        return None
    from kernels.allreduce import Schedule
    from mesh.devices import ensure_cpu_devices
    from mesh.executors import Executor, Grid
    from mesh.wafer import emulated_spec, parse_bytes
    from model.wafer_layout import LayoutMode

    grid = Grid.parse(args.mesh)
    executor = Executor(args.executor)
    if args.groups is not None and args.groups < 1:
        raise WaferError(f"--groups must be positive, got {args.groups}")
    spec = emulated_spec(parse_bytes(args.sram_budget)) if args.sram_budget else None
    if has_process_flags:
        join_processes(args, grid, executor)  # sets this process's device count itself
    if executor is Executor.DEVICES and getattr(args, "coordinator", None) is None:
        ensure_cpu_devices(grid.cores)
    schedule = None if args.schedule == "auto" else Schedule(args.schedule)
    return MeshSetup(grid, executor, schedule, args.groups, spec, LayoutMode(args.layout))


# ------------------------------------------------------------------------------ benchmark harness


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds the report alone."""
    print(message, file=sys.stderr, flush=True)


def progress_bar(total: int, unit: str, **options):
    """A tqdm bar on stderr (stdout holds the report alone); `options` go to tqdm (desc, leave,
    disable, mininterval)."""
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, **options)


def busy_check() -> float | None:
    """The 1-minute load average, with a warning on stderr when other work competes for the CPUs.

    Every figure of a benchmark is a rate on shared cores: a busy machine slows our decoder, HF
    (whose spinning threads suffer most) and the bound measurements by different amounts, so the
    ratios stop meaning anything.
    """
    if not hasattr(os, "getloadavg"):
        return None
    load = round(os.getloadavg()[0], 2)
    cpus = os.cpu_count() or 1
    if load > BUSY_LOAD_PER_CPU * cpus:
        progress(f"warning: load average {load} on {cpus} CPUs: other processes compete for the "
                 f"cores, so the rates and ratios below are unreliable")
    return load


def run_sweep(args, n_points: int, what: str, measure, write_plot, format_report, format_point) -> int:
    """The part every benchmark sweep shares: the plot path checked before any work, the model
    loaded, `measure(loaded, load_start, on_point)` run under a progress bar of `n_points` (each
    point's figures, `format_point(point)`, written above the bar as it is measured: a sweep takes
    minutes to hours), the plot drawn, the report (or its JSON) printed."""
    import json

    from bench.sweep_plots import check_plot_path
    from model.load import load_model

    if args.plot is not None:
        check_plot_path(args.plot)
    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    load_start = busy_check()
    progress(f"{what}: {n_points} points, {args.repeats} timed runs each (after one that compiles)")
    with progress_bar(n_points, "point") as bar:
        def on_point(point: dict) -> None:
            bar.write(format_point(point), file=sys.stderr)
            bar.update(1)

        report = measure(loaded, load_start, on_point)
    if args.plot is not None:
        report["plot"] = write_plot(report, args.plot)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
