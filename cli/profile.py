"""`wafer profile`: what a decode layout costs on a real wafer, from a trace of its per-core program.

Nothing is allocated or run: the decode step is traced at real tile sizes (the trace executor,
model/trace_decode.py) and priced by the cost model in mesh/cost_model.py. Reports
(bench/profile_report.py) are tables, or one JSON object with `--json`; `--plot DIR` writes the
PNGs of bench/plots.py; `--grid auto` runs the autotuner (bench/autotune.py).
"""

from __future__ import annotations

import argparse
import json

from cli.flags import add_layout_arg, progress, progress_bar
from mesh.errors import WaferError

PROFILE_SCHEDULES = ("auto", "psum", "ring", "ktree")
COMPARE_GRIDS = ("360x360", "480x96", "360x240", "750x128")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b", help="model preset (default: llama3-8b)")
    p.add_argument("--wafer", default="wse2", help="wafer spec: wse2 or wse3 (default: wse2)")
    p.add_argument("--grid", default="360x360", help="RxC cores per stage, or 'auto' for the fastest that fits")
    p.add_argument("--schedule", choices=PROFILE_SCHEDULES, default="ktree",
                   help="all-reduce schedule (default ktree, WaferLLM's; auto: the one the cost model "
                        "predicts fastest for this layout, each profiled in turn)")
    p.add_argument("--groups", type=int, default=None, help="K-tree groups per mesh axis (default ~sqrt)")
    add_layout_arg(p)
    p.add_argument("--batch", type=int, default=1, help="decode slots (default 1)")
    p.add_argument("--context", type=int, default=4096, help="KV positions per sequence (default 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="storage of weights, KV cache and activations, as `--dtype` of generate and serve "
                        "(scores and logits stay float32; default bfloat16, as the published figures)")
    p.add_argument("--accounting", choices=["full", "per-layer"], default="full",
                   help="full: the whole step (layers, embedding, LM head, sampling, hand-offs); per-layer: "
                        "one layer x layers, as WaferLLM's decode benchmark measured (default full)")
    p.add_argument("--compare-layouts", action="store_true", help="rank grids and schedules for the model")
    p.add_argument("--published", action="store_true", help="predicted vs published decode figures")
    p.add_argument("--calibrate", action="store_true",
                   help="solve the two calibrated constants on WaferLLM's 8B and 72B rows at 420x420")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to DIR")


def _setup(args):
    from kernels.allreduce import Schedule
    from mesh.wafer import SPECS
    from model.config import preset

    config = preset(args.model)
    if args.wafer not in SPECS:
        raise WaferError(f"unknown wafer {args.wafer!r}; known: {', '.join(SPECS)}")
    for flag in ("batch", "context"):
        if getattr(args, flag) < 1:
            raise WaferError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.groups is not None and args.groups < 1:
        raise WaferError(f"--groups must be positive, got {args.groups}")
    return config, SPECS[args.wafer], None if args.schedule == "auto" else Schedule(args.schedule)


def _accounting(args):
    from model.trace_decode import Accounting
    return Accounting(args.accounting)


def _autotune(config, spec, schedule, args, bar):
    from bench.autotune import autotune_candidates, autotune_grid
    candidates = autotune_candidates(spec)
    progress(f"autotuning {config.name} on {spec.name}: {len(candidates)} grids"
             + (f" x {schedule.value}" if schedule is not None else "") + " ...")
    return autotune_grid(config, spec, schedule, args.batch, args.context, args.dtype, candidates, args.groups,
                         _accounting(args), on_candidate=lambda: bar.update(1))


def run(args) -> int:
    config, spec, schedule = _setup(args)
    from bench.profile_report import format_report, profile_report
    from mesh.executors import Grid
    from model.trace_decode import profile_layout
    from model.wafer_layout import LayoutMode

    if args.calibrate:
        from bench.published import calibrate
        print(json.dumps(calibrate(progress), indent=1))
        return 0
    if args.published:
        return _run_published(args)
    if args.compare_layouts:
        return _run_compare(config, spec, args)

    bar = None
    if args.grid == "auto":  # minutes with --schedule auto: every candidate grid per schedule
        from bench.autotune import autotune_candidates
        from kernels.allreduce import Schedule
        bar = progress_bar(len(autotune_candidates(spec)) * (len(Schedule) if schedule is None else 1), "grid")

    def profile_with(s):
        if args.grid == "auto":
            return _autotune(config, spec, s, args, bar)[0]
        return profile_layout(config, Grid.parse(args.grid), spec, s, args.groups, args.batch,
                              args.context, args.dtype, LayoutMode(args.layout), _accounting(args))

    try:
        if schedule is None:
            profile, choice = _fastest_schedule(profile_with)
        else:
            profile, choice = profile_with(schedule), None
    finally:
        if bar is not None:
            bar.close()
    report = profile_report(profile)
    if choice is not None:
        report["schedule_choice"] = choice
    if args.plot:
        from bench.plots import write_plots
        report["plots"] = write_plots(profile, args.plot, progress)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _fastest_schedule(profile_with):
    """`--schedule auto`: every schedule profiled on the same layout; the one with the shortest
    predicted token wins (ties to the first in `Schedule`'s order). Returns that profile and the
    choice, {"chosen", "token_us": {schedule: us}, "not_fitting": {schedule: reason}}; a schedule
    that does not fit is skipped, and when none fits the first one's error is raised."""
    from kernels.allreduce import Schedule

    profiles, not_fitting = {}, {}
    for s in Schedule:
        try:
            profiles[s] = profile_with(s)
        except WaferError as e:
            not_fitting[s.value] = str(e)
    if not profiles:
        raise WaferError(f"--schedule auto: no schedule fits; {next(iter(not_fitting.values()))}")
    best = min(profiles, key=lambda s: profiles[s].token_s)
    return profiles[best], {"chosen": best.value,
                            "token_us": {s.value: p.token_s * 1e6 for s, p in profiles.items()},
                            "not_fitting": not_fitting}


def _run_compare(config, spec, args) -> int:
    from bench.profile_report import table
    from kernels.allreduce import Schedule
    from mesh.executors import Grid
    from model.trace_decode import profile_layout
    from model.wafer_layout import LayoutMode

    grids = [Grid.parse(g) for g in COMPARE_GRIDS]
    if args.grid != "auto" and Grid.parse(args.grid) not in grids:
        grids.insert(0, Grid.parse(args.grid))
    grids = [g for g in grids if g.rows <= spec.max_rows and g.cols <= spec.max_cols]
    progress(f"comparing {len(grids)} grids x {len(Schedule)} schedules for {config.name} on {spec.name} ...")
    rows, skipped = [], []
    with progress_bar(len(grids) * len(Schedule), "layout") as bar:
        for g in grids:
            for s in Schedule:
                try:
                    rows.append(profile_layout(config, g, spec, s, args.groups, args.batch, args.context, args.dtype,
                                               LayoutMode(args.layout), _accounting(args)))
                except WaferError as e:
                    skipped.append({"grid": str(g), "schedule": s.value, "reason": str(e)})
                bar.update(1)
    rows.sort(key=lambda p: p.token_s)
    ranked = [{"rank": i + 1, "grid": str(p.grid), "schedule": p.schedule.value,
               "tokens_per_s_per_request": p.tokens_per_s, "layer_us": p.layer_s * 1e6, "wafers": p.staging.wafers,
               "stages": p.staging.stages, "shares": p.shares()} for i, p in enumerate(rows)]
    if args.json:
        print(json.dumps({"model": config.name, "wafer": spec.name, "ranked": ranked, "not_fitting": skipped}))
        return 0
    print(table(["rank", "grid", "schedule", "tok/s/req", "layer us", "stages", "wafers", "fabric share"],
                 [[r["rank"], r["grid"], r["schedule"], f"{r['tokens_per_s_per_request']:,.0f}",
                   f"{r['layer_us']:.2f}", r["stages"], r["wafers"], f"{r['shares']['fabric']:.0%}"] for r in ranked]))
    for s in skipped:
        print(f"not fitting: {s['grid']} {s['schedule']}: {s['reason']}")
    return 0


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _run_published(args) -> int:
    from bench.profile_report import table
    from bench.published import constants_note, published_table
    rows = published_table(progress)
    constants = constants_note()
    if args.json:
        print(json.dumps({"rows": rows, "constants": constants}))
        return 0
    print(table(["figure", "published", "predicted", "ratio", "cell", "setup"],
                [[r["figure"], _fmt(r["published"]), _fmt(r["predicted"]), _fmt(r["ratio"], 2), r["cell"], r["setup"]]
                 for r in rows]))
    print()
    for r in rows:
        print(f"- {r['figure']}: {r['comment']}")
    print()
    print(table(["constant", "value", "calibrated", "source"],
                [[c["constant"], f"{c['value']:.4g}", "yes" if c["calibrated"] else "no", c["source"]]
                 for c in constants]))
    return 0
