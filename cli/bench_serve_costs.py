"""`wafer bench serve-costs`: profile this machine's serving workers into a measured cost file for
`wafer simulate --measured` (bench/serve_costs.py). Pass the flags the server runs with: the
workers are built, and pinned to CPUs, as `wafer serve` builds and pins them."""

from __future__ import annotations

import argparse
import json
import pathlib

from cli import serve as serve_cmd
from cli.flags import busy_check, int_list, positive_int, progress, progress_bar
from mesh.errors import WaferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.serve_costs import CostsBench

    serve_cmd.add_arguments(p)  # the server's own flags: the same meshes, slots and CPUs
    d = CostsBench.__dataclass_fields__
    join = ",".join
    p.add_argument("--prompt-lens", type=int_list, default=d["prompt_lens"].default,
                   help=f"prompt tokens of the prefill batches and handoffs (default {join(map(str, d['prompt_lens'].default))})")
    p.add_argument("--prefill-batches", type=int_list, default=d["prefill_batches"].default,
                   help=f"prompts per prefill batch (default {join(map(str, d['prefill_batches'].default))})")
    p.add_argument("--occupancies", type=int_list, default=d["occupancies"].default,
                   help=f"occupied decode slots per step (default {join(map(str, d['occupancies'].default))})")
    p.add_argument("--contexts", type=int_list, default=d["contexts"].default,
                   help=f"positions held per occupied slot (default {join(map(str, d['contexts'].default))})")
    p.add_argument("--repeats", type=positive_int, default=d["repeats"].default,
                   help="timed runs per shape, after one unmeasured; medians reported (default %(default)s)")
    p.add_argument("--out", required=True, metavar="FILE", help="the measured cost file to write (JSON)")
    p.add_argument("--json", action="store_true", help="print the file's contents as one JSON object")


def run(args) -> int:
    from bench.serve_costs import CostsBench, format_report, run_costs_bench

    options = serve_cmd.options_from_args(args)
    if options.distributed is not None:
        raise WaferError("serve-costs measures one decode process; --coordinator is not supported")
    out = pathlib.Path(args.out)
    if not out.parent.is_dir():
        raise WaferError(f"--out {args.out}: folder {out.parent} does not exist")
    bench = CostsBench(options, args.prompt_lens, args.prefill_batches, args.occupancies, args.contexts,
                       args.repeats)
    busy_check()
    total = sum(bench.samples.values())
    progress(f"wafer bench serve-costs: {total} shapes of the {options.mode.value} workers, "
             f"{args.repeats} timed runs each (compilation first)")
    with progress_bar(total, "shape") as bar:
        report = run_costs_bench(bench, lambda: bar.update(1))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else format_report(report) + f"\n  written to {out}")
    return 0
