"""PNGs of the scaling sweeps (matplotlib, Agg backend): decode tok/s against batch, one line per
context, with the bandwidth bound drawn dashed; prefill tok/s and MFU against prompt length, one
line per batch, with the matmul peak drawn."""

from __future__ import annotations

import os

from bench.plots import agg_pyplot
from mesh.errors import WaferError


def check_plot_path(path: str) -> None:
    """Fail before any measurement when the plot could not be written: an unknown format, or a
    folder that cannot be made."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg", ".pdf"):
        raise WaferError(f"--plot {path}: the file must end in .png, .svg or .pdf")
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WaferError(f"--plot {path}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise WaferError(f"--plot {path}: folder {folder} is not writable")


def _save(plt, fig, path: str, env: dict, note: str) -> str:
    """Write `fig` with the machine, its load average and `note` under it."""
    fig.text(0.01, -0.02, f"{env['cpu_count']} CPUs ({env['cpu_model']}), load average "
                          f"{env.get('loadavg_1m_start')} -> {env.get('loadavg_1m_end')}{note}", fontsize=8, wrap=True)
    check_plot_path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(points: list[dict], line_key: str, x_key: str) -> dict[int, list[dict]]:
    """The points that ran, grouped by `line_key` and sorted by `x_key`."""
    out: dict[int, list[dict]] = {}
    for p in points:
        if not p["skipped"]:
            out.setdefault(p[line_key], []).append(p)
    return {k: sorted(v, key=lambda p: p[x_key]) for k, v in sorted(out.items())}


def _skipped_note(points: list[dict], keys: tuple[str, str]) -> str:
    skipped = [" ".join(f"{k.replace('_', ' ')} {p[k]}" for k in keys) for p in points if p["skipped"]]
    return f"; not run (memory or the model's context, see the JSON): {', '.join(skipped)}" if skipped else ""


def _log2_axes(axes, points: list[dict], x_key: str) -> None:
    """A base-2 x axis ticked at the values that ran, a grid and a legend on each of `axes`."""
    xs = sorted({p[x_key] for p in points if not p["skipped"]})
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.minorticks_off()
        a.grid(True, which="major", alpha=0.3)
        a.legend(fontsize=8)


def write_decode_plot(r: dict, path: str) -> str:
    """Aggregate tok/s against batch (bound dashed, same colour) and the fraction of the bound."""
    plt = agg_pyplot()
    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (context, pts) in enumerate(_series(r["points"], "context", "batch").items()):
        color = f"C{i % 10}"
        batches = [p["batch"] for p in pts]
        ax.plot(batches, [p["tok_per_s_aggregate"] for p in pts], "o-", color=color, label=f"context {context}")
        ax.plot(batches, [p["roofline_tok_per_s"] * p["batch"] for p in pts], "--", color=color, alpha=0.7)
        ax_f.plot(batches, [p["roofline_fraction"] for p in pts], "o-", color=color, label=f"context {context}")
    ax.plot([], [], "k--", alpha=0.7, label=f"bandwidth bound ({r['bandwidth_gbs']:.0f} GB/s)")
    fig.suptitle(f"{r['model']} ({r['dtype']}) decode, {r['steps']} steps x {r['repeats']} runs per point (median), "
                 f"cache {r['cache']}")
    ax.set(yscale="log", xlabel="batch", ylabel="tok/s, all sequences", title="measured (solid) vs bound (dashed)")
    ax_f.axhline(1.0, color="k", ls="--", alpha=0.7, label="bound")
    ax_f.set(ylim=(0, 1.1), xlabel="batch", ylabel="fraction of the bandwidth bound", title="fraction of the bound")
    _log2_axes((ax, ax_f), r["points"], "batch")
    ax.grid(True, which="both", axis="y", alpha=0.3)
    return _save(plt, fig, path, r["env"], _skipped_note(r["points"], ("batch", "context")))


def write_prefill_plot(r: dict, path: str) -> str:
    """Achieved GFLOP/s against prompt length (matmul peak drawn) and MFU, one line per batch."""
    plt = agg_pyplot()
    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (batch, pts) in enumerate(_series(r["points"], "batch", "prompt_len").items()):
        color = f"C{i % 10}"
        lens = [p["prompt_len"] for p in pts]
        ax.plot(lens, [p["achieved_gflops"] for p in pts], "o-", color=color, label=f"batch {batch}")
        ax_f.plot(lens, [p["mfu"] for p in pts], "o-", color=color, label=f"batch {batch}")
    ax.axhline(r["matmul_peak_gflops"], color="k", ls="--", alpha=0.7,
               label=f"matmul peak ({r['matmul_peak_gflops']:.0f} GFLOP/s, {r['matmul_peak_source']})")
    fig.suptitle(f"{r['model']} ({r['dtype']}) prefill on the {r['mesh']} mesh ({r['executor']}), {r['repeats']} runs "
                 f"per point (median), chunks of {r['chunk']} tokens")
    ax.set(ylim=(0, r["matmul_peak_gflops"] * 1.1), xlabel="prompt length (tokens)", ylabel="GFLOP/s of needed work",
           title="achieved vs the matmul peak (dashed)")
    ax_f.axhline(1.0, color="k", ls="--", alpha=0.7, label="peak")
    ax_f.set(ylim=(0, 1.1), xlabel="prompt length (tokens)", ylabel="MFU (fraction of the matmul peak)",
             title="MFU")
    _log2_axes((ax, ax_f), r["points"], "prompt_len")
    return _save(plt, fig, path, r["env"], _skipped_note(r["points"], ("batch", "prompt_len")))
