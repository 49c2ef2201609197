"""PNGs of `wafer simulate` (matplotlib, Agg backend): latency percentile curves of one run, and
the sweeps' goodput against the prefill:decode split or the input:output ratio, and the answer
to issue 14's question (bars per mix and mode, a tornado of its sensitivity)."""

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


def write_question_plot(out: dict, out_dir: str) -> str:
    """Goodput and fast-token capacity of each fleet at the footprint, per accelerator and mix."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    rows = out["rows"]
    labels = [f"{r['accelerator']}\n{r['mix']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "goodput_req_s", "goodput (req/s within SLOs)"),
                           (axes[1], "fast_tokens_s", "fast-token capacity (tok/s)")):
        for k, (mode, colour) in enumerate((("disaggregated", "tab:orange"), ("integrated", "tab:blue"))):
            vals = [r[mode][key] for r in rows]
            ax.bar(x + (k - 0.5) * 0.4, vals, 0.4, label=mode, color=colour)
        for xi, r in zip(x, rows):
            ratio = r["goodput_ratio" if key == "goodput_req_s" else "fast_tokens_ratio"]
            top = max(r["disaggregated"][key], r["integrated"][key], 1e-9)
            ax.annotate("integ. 0" if ratio is None else f"{ratio:.2g}x", (xi, top), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(0, 10 * max([max(r["disaggregated"][key], r["integrated"][key]) for r in rows] + [1.0]))
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    a = out["assumptions"]
    fig.suptitle(f"{out['model']}: {out['power_kw']:g} kW each; fast = {a['fast_speed']:g} tok/s per user "
                 f"(TPOT SLO), TTFT SLO {a['ttft_s']:g} s; label: disaggregated / integrated", fontsize=10)
    path = os.path.join(out_dir, f"question_fast{a['fast_speed']:g}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_sensitivity_plot(out: dict, out_dir: str) -> str:
    """A tornado: the goodput ratio disaggregated / integrated with one assumption moved at a time,
    on a log axis around the base; a move to 'integrated serves none' is drawn to the right edge."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    base = out["base"]["goodput_ratio"]
    rows = out["rows"][::-1]  # widest on top
    vals = [m["goodput_ratio"] for r in rows for m in r["moves"] if m["goodput_ratio"]] + ([base] if base else [])
    lo, hi = (min(vals) / 2, max(vals) * 4) if vals else (0.01, 100.0)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    for y, r in enumerate(rows):
        n = len(r["moves"])
        for k, m in enumerate(r["moves"]):
            v = m["goodput_ratio"]
            end = hi if v is None else max(v, lo)
            start = base if base else lo
            yk = y + (k - (n - 1) / 2) * min(0.22, 0.8 / n)  # several moves of one assumption side by side
            if m.get("disaggregated_goodput_req_s") == 0 and m.get("integrated_goodput_req_s") == 0:
                ax.annotate(f"{m['value']}: neither serves", (start, yk), fontsize=7, va="center", ha="left")
                continue
            ax.plot([start, end], [yk, yk], color="tab:red" if v is None else "tab:gray", lw=max(2, 8 / n),
                    alpha=0.6, solid_capstyle="butt")
            ax.annotate(f"{m['value']}: " + ("integ. 0" if v is None else f"{v:.2g}x"), (end, yk), fontsize=7,
                        va="center", ha="left" if end >= (base or lo) else "right")
    if base:
        ax.axvline(base, color="k", lw=1)
    ax.axvline(5.0, color="tab:green", ls="--", lw=1, label="the claimed 5x")
    ax.set_xscale("log")
    ax.set_xlim(lo / 3, hi * 3)
    ax.set_yticks(range(len(rows)), [r["assumption"] for r in rows], fontsize=8)
    ax.set_xlabel("goodput ratio, disaggregated / integrated (equal power)")
    b = out["base"]
    ax.set_title(f"{out['accelerator']}, {out['mix']}, {out['power_kw']:g} kW: base "
                 + ("integ. 0" if base is None else f"{base:.2g}x") + f" ({b['disaggregated']} vs {b['integrated']})",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    path = os.path.join(out_dir, f"sensitivity_{out['accelerator']}_{out['mix']}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
