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
    for key in ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "request_throughput",
                "output_throughput"):
        tol = THROUGHPUT_TOLERANCE if key.endswith("throughput") else LATENCY_TOLERANCE
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
