"""`wafer bench decode`: its flags, and the report of `bench.decode` on stdout."""

from __future__ import annotations

import argparse
import json

from bench.decode import DecodeBench, check_fits, format_table, run_decode_bench
from cli.flags import (add_dtype_arg, add_mesh_args, add_model_args, busy_check, int_at_least, positive_int, progress,
                       setup_mesh)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded in lockstep")
    p.add_argument("--context", type=positive_int, default=256, help="prompt length in tokens")
    p.add_argument("--steps", type=positive_int, default=128, help="decode steps timed per run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers' generate")
    p.add_argument("--compare-llamacpp", action="store_true",
                   help="also time llama.cpp (f32 and f16 conversions of the GGUF, batch 1; "
                        "needs pip install -e '.[peers]')")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int_at_least(0, ">= 0"), default=0, help="seed of the random prompts")
    add_mesh_args(p)


def run(args) -> int:
    from model.load import load_model

    if args.compare_llamacpp:
        from bench.llamacpp_peer import import_llama_cpp
        import_llama_cpp()  # a missing peer fails before anything is loaded
    mesh_setup = setup_mesh(args)  # before JAX starts: it may emulate CPU devices
    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    bench = DecodeBench(args.batch, args.context, args.steps, args.repeats, args.seed, args.compare_hf,
                        args.compare_llamacpp)
    check_fits(loaded.config, bench)  # before the busy check's warning: a bad request is one line
    report = run_decode_bench(loaded, bench, mesh_setup, busy_check(), progress)
    print(json.dumps(report) if args.json else format_table(report))
    return 0
