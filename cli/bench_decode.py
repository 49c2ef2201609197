"""`wafer bench decode`: its flags, and the report of `bench.decode` on stdout; with --batches,
--contexts or --plot, a sweep over batches x contexts (`bench.sweep`)."""

from __future__ import annotations

import argparse
import json

from cli import flags
from cli.flags import (add_dtype_arg, add_mesh_args, add_model_args, busy_check, int_at_least, int_list, positive_int,
                       progress, setup_mesh)
from mesh.errors import WaferError

STEPS, SWEEP_STEPS = 128, 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_dtype_arg(p)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=positive_int, default=1, help="sequences decoded in lockstep")
    batch.add_argument("--batches", type=int_list, default=None, metavar="B1,B2,...",
                       help="sweep: every batch in the list (with --contexts: every pair)")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", type=positive_int, default=256, help="prompt length in tokens")
    context.add_argument("--contexts", type=int_list, default=None, metavar="C1,C2,...",
                         help="sweep: every context in the list, decoded from a filled cache (no prefill)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="sweep: draw tok/s and the fraction of the bandwidth bound per point into this file")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"decode steps timed per run (default {STEPS}; {SWEEP_STEPS} per point in a sweep)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers' generate")
    p.add_argument("--compare-llamacpp", action="store_true",
                   help="also time llama.cpp (f32 and f16 conversions of the GGUF, batch 1; "
                        "needs pip install -e '.[peers]')")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int_at_least(0, ">= 0"), default=0, help="seed of the random prompts")
    add_mesh_args(p)


def run(args) -> int:
    if args.batches is not None or args.contexts is not None or args.plot is not None:
        return run_sweep(args)
    # Imported here, not at the top: bench.decode imports JAX, which every other command
    # (`wafer --help`, `wafer simulate`) would otherwise pay for at startup.
    from bench.decode import DecodeBench, check_fits, format_table, run_decode_bench
    from model.load import load_model

    if args.compare_llamacpp:
        from bench.llamacpp_peer import import_llama_cpp
        import_llama_cpp()  # a missing peer fails before anything is loaded
    mesh_setup = setup_mesh(args)  # before JAX starts: it may emulate CPU devices
    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    bench = DecodeBench(args.batch, args.context, args.steps or STEPS, args.repeats, args.seed, args.compare_hf,
                        args.compare_llamacpp)
    check_fits(loaded.config, bench)  # before the busy check's warning: a bad request is one line
    report = run_decode_bench(loaded, bench, mesh_setup, busy_check(), progress)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def run_sweep(args) -> int:
    """Every (batch, context) point against one bandwidth bound, with a progress bar."""
    from bench.sweep import DecodeSweep, format_decode_point, format_decode_sweep, run_decode_sweep
    from bench.sweep_plots import write_decode_plot

    for flag in ("compare_hf", "compare_llamacpp"):
        if getattr(args, flag):
            raise WaferError(f"--{flag.replace('_', '-')} times one point; a sweep (--batches, --contexts, --plot) "
                             f"does not take it")
    if args.mesh is not None:
        raise WaferError("a sweep (--batches, --contexts, --plot) decodes on one device; --mesh times one point")
    setup_mesh(args)  # refuses the other mesh flags without --mesh
    sweep = DecodeSweep(args.batches or (args.batch,), args.contexts or (args.context,), args.steps or SWEEP_STEPS,
                        args.repeats, args.seed)
    return flags.run_sweep(
        args, len(sweep.points()), f"wafer bench decode sweep ({sweep.steps} steps per run)",
        lambda loaded, load_start, on_point: run_decode_sweep(loaded, sweep, load_start, progress, on_point),
        write_decode_plot, format_decode_sweep, format_decode_point)
