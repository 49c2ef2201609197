"""`wafer bench serve --plot`: latency percentiles against the request rate, one colour per report.

Several reports (`--compare disagg.json integrated.json`) share every panel, so the two modes are
read against the same axes and the same SLO lines: where one mode's p99 TTFT leaves its SLO at a
lower rate than the other's, the crossover is where the curves cross. Panels: TTFT, TPOT, ITL and
end-to-end latency (median solid, p99 dashed), goodput, and SLO attainment with the 90% line.
Dotted lines: each report's SLOs, and the max rate its search (or sweep) found. Runs at rate inf
(everything at once) have no place on a rate axis and are left out.
"""

from __future__ import annotations

from mesh.errors import WaferError

PANELS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "end-to-end (ms)"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_rate_plot(reports: list[dict], path: str) -> str:
    """One PNG at `path` for one or several reports; returns `path`."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    rates_all = [run["rate"] for r in reports for run in r["runs"] if run["rate"] != "inf"]
    log_x = bool(rates_all) and max(rates_all) / min(rates_all) > 10
    for i, r in enumerate(reports):
        colour = f"C{i}"
        runs = [run for run in r["runs"] if run["rate"] != "inf"]
        xs = [run["rate"] for run in runs]
        for ax, (key, title) in zip(axes.flat, PANELS):
            for q, style in (("median", "-"), ("p99", "--")):
                pts = [(x, run[key][q]) for x, run in zip(xs, runs) if run[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{r['label']} {q}")
            ax.set(title=title, xlabel="request rate (req/s)")
        for key, slo in r["slos"].items():
            panel = [k for k, _ in PANELS].index(key)
            axes.flat[panel].axhline(slo, color=colour, linestyle=":", linewidth=1, label=f"{r['label']} SLO")
        if r["slos"]:
            axes.flat[4].plot(xs, [run["goodput"] for run in runs], marker="o", color=colour, label=r["label"])
            axes.flat[5].plot(xs, [run["slo_attainment"] for run in runs], marker="o", color=colour, label=r["label"])
        best = (r.get("search") or r.get("sweep_max_rate") or {}).get("max_rate")
        if best is not None:
            axes.flat[5].axvline(best, color=colour, linestyle=":", linewidth=1, label=f"{r['label']} max rate {best:g}")
    axes.flat[4].set(title="goodput (req/s within every SLO)", xlabel="request rate (req/s)")
    axes.flat[5].axhline(0.9, color="grey", linestyle=":", linewidth=1)
    axes.flat[5].set(title="SLO attainment (90% line)", xlabel="request rate (req/s)", ylim=(-0.05, 1.05))
    for i, ax in enumerate(axes.flat):
        if log_x:
            ax.set_xscale("log")
        # The latency panels share one legend (colours, line styles, SLOs), in the first panel.
        if i in (0, 4, 5) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    first = reports[0]
    fig.suptitle(f"{first['model']}, {first['profile']['name']} ({first['profile']['input_len']} in / "
                 f"{first['profile']['output_len']} out tokens), {first['requests']} requests per rate")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80)
    except OSError as e:
        raise WaferError(f"--plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return path

