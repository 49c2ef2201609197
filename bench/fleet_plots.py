"""PNGs of `wafer simulate` (matplotlib, Agg backend): latency percentile curves of one run, and
the sweeps' goodput against the prefill:decode split or the input:output ratio."""

from __future__ import annotations

import os

import numpy as np

from serve.simulator import SimResult


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_latency_plot(result: SimResult, out_dir: str) -> str:
    """TTFT, TPOT and end-to-end latency against percentile, from the run's histograms."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    qs = np.linspace(0.01, 0.99, 99)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in (("TTFT", result.ttft), ("TPOT", result.tpot), ("E2E", result.e2e)):
        if h.quantile(0.5) is not None:
            ax.plot(qs * 100, [h.quantile(q) * 1e3 for q in qs], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms")
    ax.set_title(f"{result.mode}: {result.finished:,} requests")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    path = os.path.join(out_dir, "simulate_latency.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_sweep_plot(kind: str, rows: list[dict], out_dir: str) -> str:
    """ratio: goodput per prefill:decode split; crossover: both modes' goodput per input:output."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if kind == "ratio":
        rows = sorted(rows, key=lambda r: r["wafers"])
        ax.plot([f"{r['prefill_chips']}:{r['wafers']}" for r in rows], [r["capacity_req_s"] for r in rows], "o-")
        ax.set_xlabel("prefill accelerators : wafers")
    else:
        x = [r["ratio"] for r in rows]
        ax.plot(x, [r["disaggregated_req_s"] for r in rows], "o-", label="disaggregated (best split)")
        ax.plot(x, [r["integrated_req_s"] for r in rows], "s-", label="integrated")
        ax.set_xscale("log")
        ax.set_xlabel("input : output tokens")
        ax.legend()
    ax.set_yscale("symlog", linthresh=1.0)  # capacities span decades; 0 (nothing passes) stays on the axis
    ax.set_ylabel("goodput capacity (req/s at 90% within SLOs)")
    ax.grid(True, alpha=0.3)
    path = os.path.join(out_dir, f"simulate_sweep_{kind}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
