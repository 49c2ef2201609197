"""`wafer bench serve-overhead`: a running `wafer serve`'s TTFT and TPOT, one request at a time,
against the prefill, handoff and decode step measured directly on the same meshes
(bench/serve_overhead.py). Pass the flags the server was started with."""

from __future__ import annotations

import argparse
import json

from cli import serve as serve_cmd
from cli.flags import busy_check, positive_int, progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_cmd.add_arguments(p)  # the server's own flags: the direct measurement builds the same meshes
    p.add_argument("--url", default=None, help="the server (default: http://HOST:PORT from --host and --port)")
    p.add_argument("--input-len", type=positive_int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=64, help="output tokens (EOS ignored)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed requests and rounds; medians reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from bench.serve_overhead import OverheadBench, format_report, run_overhead_bench

    options = serve_cmd.options_from_args(args)
    url = args.url or f"http://{args.host}:{args.port}"
    busy_check()
    progress(f"wafer bench serve-overhead: {args.repeats} requests to {url}, then the same work measured directly")
    report = run_overhead_bench(OverheadBench(url, args.served_model_name, options, args.input_len,
                                              args.output_len, args.repeats))
    print(json.dumps(report) if args.json else format_report(report))
    return 0
