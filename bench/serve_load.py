"""`wafer bench serve`: open-loop load against an OpenAI-compatible server, at one rate, a sweep of
rates, or a search for the highest rate that keeps >= 90% of requests within the SLOs.

Every rate sends the same requests (same seed: same prompts, same arrival pattern scaled to the
rate), so the runs of a sweep differ only in the rate. The search (DistServe's per-GPU goodput,
here per CPU) bisects geometrically between two bounds: it measures both ends, then `steps`
midpoints, each a full run of `--requests` requests; it assumes attainment falls as the rate
rises, and reports the highest rate it measured that held the target.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import os
import platform
from typing import Callable, Protocol

import aiohttp
import numpy as np

from bench.serve_client import (LoadRun, ServerUnreachable, Target, fetch_models, fetch_worker_times, run_load,
                                worker_times_between)
from bench.serve_metrics import SLOs, summarize
from bench.serve_workload import Workload, arrival_times, make_requests
from mesh.errors import WaferError

# DistServe's SLO attainment target: the rate search keeps at least this fraction of requests
# within every SLO.
TARGET_ATTAINMENT = 0.9
# Output tokens a warm-up request asks for at most (its prompt has the workload's length).
WARMUP_OUTPUT_LEN = 16


class Bar(Protocol):
    """A progress bar (tqdm's interface)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class RateSearch:
    """Bisect between `lo` and `hi` req/s with `steps` probes after the two ends."""

    lo: float
    hi: float
    steps: int

    def __post_init__(self):
        if not 0 < self.lo < self.hi or math.isinf(self.hi):
            raise WaferError(f"--search LO:HI needs 0 < LO < HI < inf, got {self.lo}:{self.hi}")


@dataclasses.dataclass(frozen=True)
class ServeBench:
    """One invocation: where, what (`workload` under the name `profile`), and at which rates."""

    target: Target
    workload: Workload
    profile: str
    rates: tuple[float, ...]
    burstiness: float
    slos: SLOs
    search: RateSearch | None
    cpus: int
    label: str
    warmup: int = 1
    per_request: bool = False


def resolve_model(url: str, model: str | None, timeout: float) -> str:
    """`model`, or the first id the server lists. The server must answer either way (within
    `timeout` seconds): a URL that nothing listens on is an error before any load is sent."""
    try:
        models = asyncio.run(fetch_models(url, timeout))
    except ServerUnreachable:
        raise
    except WaferError:
        if model is None:
            raise
        return model  # reachable, but no model list: the given name is used as it is
    if model is not None:
        return model
    if not models:
        raise WaferError(f"{url} lists no models; pass --model")
    return models[0]


def find_max_rate(probe: Callable[[float], float], search: RateSearch,
                  target: float = TARGET_ATTAINMENT) -> tuple[float | None, list[dict]]:
    """The highest rate measured whose attainment (`probe(rate)`) is >= target, and every probe.

    None when even `lo` misses the target; `hi` when `hi` holds it (the knee lies above the range).
    """
    probes = []

    def measure(rate: float) -> bool:
        a = probe(rate)
        probes.append({"rate": round(rate, 4), "attainment": a})
        return a >= target

    lo, hi = search.lo, search.hi
    if not measure(lo):
        return None, probes
    if measure(hi):
        return hi, probes
    for _ in range(search.steps):
        mid = math.sqrt(lo * hi)
        if measure(mid):
            lo = mid
        else:
            hi = mid
    return round(lo, 4), probes


def environment(load_start: float | None) -> dict:
    env = {
        "client_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if load_start is not None:
        env["loadavg_1m_start"] = load_start
        env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return env


def warm_up(bench: ServeBench, progress: Callable[[str], None]) -> None:
    """Send `bench.warmup` requests one at a time, unmeasured, so that a server's first-request
    costs (compilation, allocation, lazy loading) stay out of the figures; and stop with one line
    if every one fails, rather than measure a load that will only fail (vLLM's initial test run)."""
    progress(f"warm-up: {bench.warmup} request(s), one at a time, not measured")
    # Prompts of their own (another seed), so no measured request finds its prompt cached; the
    # workload's prompt lengths (the prefill programs they use) but few output tokens: a decode
    # step is the same program at any length, and a decode-heavy warm-up would take minutes.
    warm = make_requests(dataclasses.replace(bench.workload, requests=bench.warmup, seed=bench.workload.seed + 1,
                                             output_len=min(bench.workload.output_len, WARMUP_OUTPUT_LEN)))
    load = run_load(dataclasses.replace(bench.target, max_concurrency=1), warm, np.zeros(len(warm)))
    if not any(rec.ok for rec in load.records):
        raise WaferError(f"the warm-up request to {bench.target.url} failed, so the load would too: "
                         f"{load.records[0].error}")


def run_serve_bench(bench: ServeBench, load_start: float | None, progress: Callable[[str], None],
                    new_bar: Callable[[int, str], Bar]) -> dict:
    """Run every rate (and the search), and return the report (the --json object).

    `progress` gets a line before each run; `new_bar(total, description)` makes the bar that one
    run advances as each request ends.
    """
    w = bench.workload
    specs = make_requests(w)
    runs: list[dict] = []
    if bench.warmup:
        warm_up(bench, progress)

    def one_run(rate: float) -> dict:
        arrivals = arrival_times(w.requests, rate, bench.burstiness, w.seed)
        progress(f"rate {rate:g} req/s: {w.requests} requests of ~{w.input_len} in / ~{w.output_len} out tokens")
        bar = new_bar(w.requests, f"rate {rate:g}")
        before = fetch_worker_times(bench.target.url)
        try:
            load: LoadRun = run_load(bench.target, specs, arrivals, on_done=lambda rec: bar.update(1))
        finally:
            bar.close()
        summary = summarize(load, rate, bench.burstiness, bench.slos, bench.per_request)
        workers = worker_times_between(before, fetch_worker_times(bench.target.url))
        if workers is not None:  # the server's own times of its workers during this run
            summary["worker_times"] = workers
        runs.append(summary)
        return summary

    for rate in bench.rates:
        one_run(rate)
    report = {
        "label": bench.label,
        "url": bench.target.url,
        "model": bench.target.model,
        "profile": {"name": bench.profile, "input_len": w.input_len, "output_len": w.output_len,
                    "spread": w.spread, "vocab_size": w.vocab_size},
        "requests": w.requests,
        "seed": w.seed,
        "burstiness": bench.burstiness,
        "max_concurrency": bench.target.max_concurrency,
        "warmup": bench.warmup,
        "slos": bench.slos.as_dict(),
        "cpus": bench.cpus,
    }
    if bench.search is not None:
        best, probes = find_max_rate(lambda r: one_run(r)["slo_attainment"], bench.search)
        report["search"] = {"target_attainment": TARGET_ATTAINMENT, "lo": bench.search.lo, "hi": bench.search.hi,
                            "steps": bench.search.steps, "probes": probes, "max_rate": best,
                            "max_rate_per_cpu": round(best / bench.cpus, 4) if best is not None else None,
                            # probes too short to hold their rate (bench.serve_metrics.sustained)
                            "bursts": [r["rate"] for r in runs if r.get("sustained") is False]}
    elif bench.slos and len(bench.rates) > 1:
        held = [r["rate"] for r in runs if r["rate"] != "inf" and r["slo_attainment"] >= TARGET_ATTAINMENT]
        best = max(held) if held else None
        report["sweep_max_rate"] = {"target_attainment": TARGET_ATTAINMENT, "max_rate": best,
                                    "max_rate_per_cpu": round(best / bench.cpus, 4) if best is not None else None}
    report["runs"] = sorted(runs, key=lambda r: np.inf if r["rate"] == "inf" else r["rate"])
    report["env"] = environment(load_start)
    return report
