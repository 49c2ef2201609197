"""`wafer bench prefill`: its flags, and the report of `bench.prefill` on stdout; with --batches,
--prompt-lens or --plot, a sweep over batches x prompt lengths (`bench.sweep`)."""

from __future__ import annotations

import argparse
import json

from cli import flags
from cli.flags import (add_dtype_arg, add_model_args, busy_check, int_at_least, int_list, positive_int,
                       progress)
from mesh.errors import WaferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_dtype_arg(p)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=positive_int, default=8, help="prompts prefilled together")
    batch.add_argument("--batches", type=int_list, default=None, metavar="B1,B2,...",
                       help="sweep: every batch in the list (with --prompt-lens: every pair)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--prompt-len", type=positive_int, default=512, help="tokens per prompt")
    length.add_argument("--prompt-lens", type=int_list, default=None, metavar="N1,N2,...",
                        help="sweep: every prompt length in the list")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="sweep: draw GFLOP/s against the matmul peak and the MFU per point into this file")
    p.add_argument("--mesh", default="1x1",
                   help="prefill mesh RxC: R data-parallel rows (batch split), C tensor-parallel columns "
                        "(heads and F split); N means 1xN (default 1x1: one device)")
    p.add_argument("--executor", choices=["devices", "vcores"], default="devices",
                   help="devices: one JAX device per mesh core; vcores: virtual cores on one device")
    p.add_argument("--chunk", type=positive_int, default=None, help="tokens per prefill chunk (default 2048)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers' forward on the batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int_at_least(0, ">= 0"), default=0, help="seed of the random prompts")


def run(args) -> int:
    from mesh.devices import ensure_cpu_devices
    from mesh.executors import Executor, Grid
    from model.load import load_model

    sweep = args.batches is not None or args.prompt_lens is not None or args.plot is not None
    if sweep and args.compare_hf:
        raise WaferError("--compare-hf times one point; a sweep (--batches, --prompt-lens, --plot) does not take it")
    grid = Grid.parse(args.mesh)
    executor = Executor(args.executor)
    if executor is Executor.DEVICES:
        ensure_cpu_devices(grid.cores)  # before JAX starts
    if sweep:
        return run_sweep(args, grid, executor)
    from bench.prefill import PrefillBench, check_fits, format_table, run_prefill_bench

    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    bench = PrefillBench(args.batch, args.prompt_len, args.chunk, args.repeats, args.seed, args.compare_hf)
    check_fits(loaded.config, bench)  # before the busy check's warning: a bad request is one line
    report = run_prefill_bench(loaded, bench, grid, executor, busy_check(), progress)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def run_sweep(args, grid, executor) -> int:
    """Every (batch, prompt length) point against one matmul peak, with a progress bar."""
    from bench.sweep import PrefillSweep, format_prefill_point, format_prefill_sweep, run_prefill_sweep
    from bench.sweep_plots import write_prefill_plot

    sweep = PrefillSweep(args.batches or (args.batch,), args.prompt_lens or (args.prompt_len,), args.chunk,
                         args.repeats, args.seed)
    return flags.run_sweep(
        args, len(sweep.points()), f"wafer bench prefill sweep on the {grid} mesh",
        lambda loaded, load_start, on_point: run_prefill_sweep(loaded, sweep, grid, executor, load_start, progress,
                                                               on_point),
        write_prefill_plot, format_prefill_sweep, format_prefill_point)
