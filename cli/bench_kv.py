"""`wafer bench kv`: its flags, and the report of `bench.kv` on stdout."""

from __future__ import annotations

import argparse
import json

from bench.kv import KVBench, format_report, run_kv_bench
from cli.flags import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset whose cache shape is measured")
    p.add_argument("--tokens", type=positive_int, default=4096, help="cached positions of the sequence")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--skip-transports", action="store_true", help="only the in-process figures")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    report = run_kv_bench(KVBench(args.model, args.tokens, args.repeats, args.skip_transports))
    print(json.dumps(report) if args.json else format_report(report, args.repeats))
    return 0
