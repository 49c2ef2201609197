"""The profiler's PNGs (matplotlib, Agg backend): SRAM and fabric heatmaps of a stage's grid, the
time per kernel, and schedules against grid sizes."""

from __future__ import annotations

import os

from mesh.errors import WaferError

COMPARE_GRIDS = ("180x180", "360x360", "480x96", "360x240", "750x128")


def agg_pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(profile, out_dir: str, progress) -> list[str]:
    """Write the four plots of one profile into `out_dir`; returns their paths."""
    from bench.profile_report import fabric_map, sram_map
    from kernels.allreduce import Schedule
    from mesh.executors import Grid
    from model.trace_decode import profile_layout

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise WaferError(f"--plot {out_dir}: {e.strerror}") from None
    plt = agg_pyplot()
    title = f"{profile.config.name} on {profile.spec.name}, {profile.grid} per stage, {profile.schedule.value}"
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    allocated, useful = sram_map(profile)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(useful / 1024, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="KiB per core that is not padding")
    ax.set(title=f"SRAM per core (allocated {allocated[0, 0] / 1024:.1f} KiB everywhere)\n{title}",
           xlabel="column", ylabel="row")
    save(fig, "sram_heatmap.png")

    progress("fabric map ...")
    sent = fabric_map(profile)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sent / 1024, cmap="magma", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="KiB sent per token")
    ax.set(title=f"Fabric traffic per core, one stage\n{title}", xlabel="column", ylabel="row")
    save(fig, "fabric_heatmap.png")

    names = list(profile.per_token)
    comp = [profile.per_token[n].compute_s * 1e6 for n in names]
    mem = [profile.per_token[n].memory_s * 1e6 for n in names]
    fab = [profile.per_token[n].fabric_s * 1e6 for n in names]
    local = [max(c, m) for c, m in zip(comp, mem)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, local, label="local (max of compute, SRAM)")
    ax.bar(names, fab, bottom=local, label="fabric")
    ax.set(ylabel="us per token", title=f"Time per kernel, all layers\n{title}")
    ax.legend()
    save(fig, "time_breakdown.png")

    progress("schedules x grids ...")
    fig, ax = plt.subplots(figsize=(7, 4))
    grids = [Grid.parse(g) for g in COMPARE_GRIDS]
    for s in Schedule:
        xs, ys = [], []
        for g in grids:
            try:
                p = profile_layout(profile.config, g, profile.spec, s, profile.groups, profile.batch,
                                   profile.context, profile.dtype, profile.mode, profile.accounting)
            except WaferError:
                continue
            xs.append(str(g))
            ys.append(p.tokens_per_s)
        ax.plot(xs, ys, marker="o", label=s.value)
    ax.set(ylabel="tokens/s per request", yscale="log", xlabel="grid per stage",
           title=f"Schedules and grids, {profile.config.name} on {profile.spec.name}")
    ax.legend()
    save(fig, "schedules_grids.png")
    return paths
