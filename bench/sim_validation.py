"""The simulator against the real server (issue 14): one `wafer bench serve` run replayed through
`wafer simulate --measured FILE --replay REPORT`, figure by figure.

Both sides use `wafer bench serve`'s (vLLM's) definitions: TTFT and TPOT percentiles are numpy's
linear percentiles over the requests that finished (the simulator's kept records, not its
streaming histograms, so both sides compute the same statistic on the same requests), and
throughput is finished requests over first arrival to last end. Targets: TTFT and TPOT p50 and
p90 within 15% of the real server's, request and output-token throughput within 10%.

A cost file is measured minutes before the run it is compared with, and this machine's speed
drifts by 30% between such minutes (bench/RESULTS.md). So the comparison also says how fast the
workers really ran during the run (the server's own histograms of its decode steps and prefill
batches, which `wafer bench serve` records as `worker_times`) against the simulated run's mean
step and batch times, and, with `--calibrate`, simulates again with the profile's fits scaled to
the run's level: the profile keeps the shape (how times grow with batch, context and prompt),
the run gives the level. The figures without it are always reported beside.
"""

from __future__ import annotations

import numpy as np

LATENCY_TOLERANCE = 0.15
THROUGHPUT_TOLERANCE = 0.10
FIGURES = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "request_throughput", "output_throughput")


def tolerance(figure: str) -> float:
    return THROUGHPUT_TOLERANCE if figure.endswith("throughput") else LATENCY_TOLERANCE


def simulated_figures(records, duration_s: float) -> dict:
    """The figures of a simulation's kept records (serve.simulator.RequestRecord), in ms and per s."""
    done = [r for r in records if r.failed is None and r.ttft is not None]
    ttft = np.array([r.ttft for r in done]) * 1e3
    tpot = np.array([r.tpot for r in done if r.tpot is not None]) * 1e3

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {"completed": len(done), "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p90_ms": pct(tpot, 90),
            "request_throughput": len(done) / duration_s, "output_throughput": sum(r.output_tokens for r in done) / duration_s}


def real_figures(run: dict) -> dict:
    """The same figures from one run of a `wafer bench serve --json` report."""
    def get(key: str, stat: str):
        return None if run.get(key) is None else run[key][stat]

    return {"completed": run["completed"], "ttft_p50_ms": get("ttft_ms", "median"), "ttft_p90_ms": get("ttft_ms", "p90"),
            "tpot_p50_ms": get("tpot_ms", "median"), "tpot_p90_ms": get("tpot_ms", "p90"),
            "request_throughput": run["request_throughput"], "output_throughput": run["output_throughput"]}


def compare(real: dict, simulated: dict) -> list[dict]:
    """One row per figure: real, simulated, simulated / real, the tolerance and whether it holds."""
    rows = []
    for key in FIGURES:
        tol = tolerance(key)
        r, s = real.get(key), simulated.get(key)
        ratio = s / r if r and s is not None else None
        rows.append({"figure": key, "real": r, "simulated": s, "ratio": ratio, "tolerance": tol,
                     "within": ratio is not None and abs(ratio - 1.0) <= tol})
    return rows


def format_comparison(rows: list[dict]) -> str:
    lines = ["vs the real run  figure              real   simulated   ratio  target"]
    for row in rows:
        def f(x):
            return "-" if x is None else f"{x:10.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        verdict = "within" if row["within"] else "MISSED"
        lines.append(f"                 {row['figure']:18s} {f(row['real'])} {f(row['simulated'])} {ratio:>7s}  "
                     f"±{row['tolerance']:.0%} {verdict}")
    return "\n".join(lines)


def worker_levels(run: dict, result) -> dict:
    """Real over simulated mean time of a decode step and of a prefill batch in the same requests:
    {"decode_step" | "prefill_batch": {real_ms, simulated_ms, ratio, real_count, simulated_count}}
    for each that both sides have (empty when the report has no `worker_times`)."""
    real = run.get("worker_times") or {}
    # Decode steps as they ran (a step that overlapped a prefill stretched, as the server's own
    # histogram times it), not as priced: with the priced times, a run whose steps overlap
    # prefills more would count the overlap twice once calibrated.
    simulated = {"decode_step": (result.decode_steps_ended, result.decode_wall_s),
                 "prefill_batch": (result.prefill_batches, result.prefill_busy_s)}
    out = {}
    for key, (n, busy) in simulated.items():
        r = real.get(key) or {}
        if r.get("count") and r.get("mean_ms") and n:
            sim_ms = 1e3 * busy / n
            out[key] = {"real_ms": r["mean_ms"], "simulated_ms": sim_ms, "ratio": r["mean_ms"] / sim_ms,
                        "real_count": r["count"], "simulated_count": n}
    return out


def format_levels(levels: dict) -> str:
    lines = ["workers' level  mean time of        real ms   simulated ms   real / simulated"]
    for key, v in levels.items():
        lines.append(f"                 {key:18s} {v['real_ms']:9.2f} {v['simulated_ms']:12.2f} {v['ratio']:14.3f}")
    return "\n".join(lines)


def conditioning(fleet, workload, slo, base: dict, draws: int, jitter_s: float, cost_spread: float,
                 seed: int = 0) -> list[dict]:
    """How far each figure moves when the same requests arrive up to `jitter_s` earlier or later
    and the workers run up to `cost_spread` faster or slower (each draw scales every prefill and
    every decode step by one uniform factor each): per figure its value in `base` (the figures of
    the unperturbed simulation), the 10th and 90th percentile over the draws, and the share of
    draws beyond the figure's tolerance from the base.

    A real run differs from its replay by at least that much (the client sends up to ~10 ms late,
    a burst lands a few ms either side of a step's end, the machine drifts by percents within a
    run). A figure that moves beyond its tolerance in many draws is a quantile on a cliff, between
    the modes of a multimodal distribution: no simulator can be held to it, and the workload
    should change, not the tolerance. Needs a cost with `scaled` (a measured cost)."""
    import dataclasses

    from serve.simulator import simulate
    rng = np.random.default_rng(seed)
    values = {key: [] for key in FIGURES}
    for _ in range(draws):
        t = np.sort(np.maximum(workload.arrival_s + rng.uniform(-jitter_s, jitter_s, len(workload)), 0.0))
        # Sorted, as arrivals must be; each position keeps its lengths (two requests may swap times).
        jittered = dataclasses.replace(workload, arrival_s=t - t[0])
        cost = fleet.cost.scaled(prefill=rng.uniform(1 - cost_spread, 1 + cost_spread),
                                 decode=rng.uniform(1 - cost_spread, 1 + cost_spread))
        result = simulate(dataclasses.replace(fleet, cost=cost), jittered, slo, keep_records=True)
        for key, value in simulated_figures(result.records, result.duration_s).items():
            if key in values and value is not None:
                values[key].append(value)
    rows = []
    for key in FIGURES:
        tol = tolerance(key)
        b, v = base.get(key), np.array(values[key])
        if b is None or not len(v):
            continue
        rows.append({"figure": key, "base": b, "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
                     "tolerance": tol, "moved": float(np.mean(np.abs(v / b - 1.0) > tol))})
    return rows


def format_conditioning(rows: list[dict], draws: int, jitter_s: float, cost_spread: float) -> str:
    lines = [f"conditioning ({draws} draws: arrivals ±{jitter_s * 1e3:.0f} ms, costs ±{cost_spread:.0%})",
             "                 figure                base    draws p10    draws p90   beyond tolerance"]
    for r in rows:
        lines.append(f"                 {r['figure']:18s} {r['base']:9.3f} {r['p10']:12.3f} {r['p90']:12.3f}   "
                     f"{r['moved']:6.0%} (±{r['tolerance']:.0%})")
    return "\n".join(lines)
