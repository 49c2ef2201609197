"""`wafer bench kv`: its flags, and the report of `bench.kv` on stdout."""

from __future__ import annotations

import argparse
import json

from cli.flags import positive_int
from mesh.errors import WaferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset whose cache shape is measured")
    p.add_argument("--tokens", type=positive_int, default=4096, help="cached positions of the sequence")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--skip-transports", action="store_true", help="only the in-process figures")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated cache dtypes measured in this run, e.g. float32,bfloat16 (the first "
                        "also over the transports; default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from bench.kv import KVBench, format_report, run_kv_bench
    from model.dtypes import DTYPES

    dtypes = tuple(d for d in args.dtypes.replace(" ", "").split(",") if d)
    bad = [d for d in dtypes if d not in DTYPES]
    if not dtypes or bad:
        raise WaferError(f"--dtypes {args.dtypes!r}: expected a comma-separated list of {', '.join(DTYPES)}")
    report = run_kv_bench(KVBench(args.model, args.tokens, args.repeats, args.skip_transports, dtypes))
    print(json.dumps(report) if args.json else format_report(report, args.repeats))
    return 0
