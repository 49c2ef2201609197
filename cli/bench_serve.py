"""`wafer bench serve`: its flags, the progress bar, and the report of `bench.serve_load` on stdout.

Exit codes: 0 when the runs completed (failed requests are counted in the report, not hidden), 1
when not one request succeeded, 2 for bad flags or a server that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from cli.flags import busy_check, int_at_least, positive_float, positive_int, progress, progress_bar
from mesh.errors import WaferError


def positive_rate(text: str) -> float:
    """A request rate in req/s: a positive number or `inf` (every request at once)."""
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: {e}") from None


def rate_list(text: str) -> tuple[float, ...]:
    rates = tuple(positive_rate(t) for t in text.replace(" ", "").split(",") if t)
    if not rates:
        raise argparse.ArgumentTypeError("--rates is empty")
    return rates


def positive_seconds(text: str) -> float:
    value = positive_rate(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError("a timeout must be finite")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.serve_workload import DEFAULT_VOCAB_SIZE, PROFILES

    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of any OpenAI-compatible server")
    p.add_argument("--model", default=None, help="model name sent with each request (default: the first of "
                                                 "GET /v1/models)")
    p.add_argument("--label", default="", help="name of this run in reports and --compare plots "
                                               "(e.g. disaggregated, integrated)")
    work = p.add_argument_group("workload")
    work.add_argument("--profile", choices=sorted(PROFILES), default="chat",
                      help="; ".join(f"{q.name}: {q.input_len} in / {q.output_len} out ({q.about})"
                                     for q in PROFILES.values()))
    work.add_argument("--input-len", type=positive_int, default=None, help="prompt tokens (overrides the profile)")
    work.add_argument("--output-len", type=positive_int, default=None, help="output tokens (overrides the profile)")
    work.add_argument("--spread", type=float, default=0.0,
                      help="lengths uniform in [L(1-s), L(1+s)] (vLLM's --random-range-ratio); 0: exact")
    work.add_argument("--vocab-size", type=int_at_least(2, "at least 2"), default=DEFAULT_VOCAB_SIZE,
                      help="prompt ids are random below this; at most the model's vocabulary")
    work.add_argument("--requests", type=positive_int, default=100, help="requests per rate")
    work.add_argument("--seed", type=int_at_least(0, ">= 0"), default=0, help="seed of prompts and arrivals")
    load = p.add_argument_group("arrivals")
    rates = load.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=positive_rate, default=math.inf,
                       help="requests per second, open loop (default inf: all at once)")
    rates.add_argument("--rates", type=rate_list, default=None, help="a sweep: comma-separated rates, e.g. 1,2,4,8")
    rates.add_argument("--search", default=None, metavar="LO:HI",
                       help="bisect for the highest rate with >= 90%% of requests within the --goodput SLOs")
    load.add_argument("--probes", type=int_at_least(0, ">= 0"), default=4,
                      help="bisection steps of --search after measuring both ends")
    load.add_argument("--burstiness", type=positive_rate, default=1.0,
                      help="gamma shape of the gaps: 1 Poisson, < 1 burstier, > 1 more regular")
    load.add_argument("--max-concurrency", type=positive_int, default=None,
                      help="at most this many requests in flight (the wait counts in TTFT)")
    load.add_argument("--warmup", type=int_at_least(0, ">= 0"), default=1,
                      help="unmeasured requests sent one at a time first (compilation, caches); if all fail, stop")
    load.add_argument("--connect-timeout", type=positive_seconds, default=10.0, help="seconds to connect")
    load.add_argument("--read-timeout", type=positive_seconds, default=300.0,
                      help="seconds a response may stay silent before its request fails")
    out = p.add_argument_group("report")
    out.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                     help="SLOs, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el): a request is good if it meets all")
    out.add_argument("--cpus", type=positive_int, default=os.cpu_count() or 1,
                     help="CPUs the server uses, for the max rate per CPU (default: this machine's)")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--per-request", action="store_true",
                     help="with --json: every request's arrival, lengths, latencies and error")
    out.add_argument("--plot", default=None, metavar="PNG", help="latency percentiles and goodput against rate")
    out.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                     help="no load: show saved --json reports side by side (and --plot them together)")


def _new_bar(total: int, desc: str):
    return progress_bar(total, "req", desc=desc, leave=False)


def _search(text: str, steps: int):
    from bench.serve_load import RateSearch
    lo, sep, hi = text.partition(":")
    try:
        return RateSearch(float(lo), float(hi), steps)
    except ValueError:
        raise WaferError(f"--search takes LO:HI in req/s, e.g. 1:32; got {text!r}") from None


def run_compare(args) -> int:
    from bench.serve_plots import write_rate_plot
    from bench.serve_report import format_compare, load_reports

    reports = load_reports(args.compare)
    if args.plot:
        progress(f"plot: {write_rate_plot(reports, args.plot)}")
    print(json.dumps(reports) if args.json else format_compare(reports))
    return 0


def run(args) -> int:
    if args.compare is not None:
        return run_compare(args)
    from bench.serve_client import Target
    from bench.serve_load import ServeBench, resolve_model, run_serve_bench
    from bench.serve_metrics import parse_slos
    from bench.serve_plots import write_rate_plot
    from bench.serve_report import format_table
    from bench.serve_workload import PROFILES, Workload

    profile = PROFILES[args.profile]
    workload = Workload(args.input_len or profile.input_len, args.output_len or profile.output_len,
                        args.requests, args.seed, args.spread, args.vocab_size)
    slos = parse_slos(args.goodput)
    search = _search(args.search, args.probes) if args.search else None
    if search is not None and not slos:
        raise WaferError("--search needs --goodput SLOs to hold, e.g. --goodput ttft:500 tpot:50")
    model = resolve_model(args.url, args.model, args.connect_timeout)
    target = Target(args.url, model, args.connect_timeout, args.read_timeout, args.max_concurrency)
    rates = () if search else (args.rates or (args.rate,))
    same = (workload.input_len, workload.output_len) == (profile.input_len, profile.output_len)
    bench = ServeBench(target, workload, args.profile if same else "custom", rates, args.burstiness, slos, search,
                       args.cpus, args.label, args.warmup, args.per_request)
    report = run_serve_bench(bench, busy_check(), progress, _new_bar)
    if args.plot:
        progress(f"plot: {write_rate_plot([report], args.plot)}")
    print(json.dumps(report) if args.json else format_table(report))
    return 0 if any(run["completed"] for run in report["runs"]) else 1
