"""`wafer profile`: what a decode layout costs on a real wafer, from a trace of its per-core program.

Nothing is allocated or run: the decode step is traced at real tile sizes (the trace executor)
and priced by the cost model in mesh/cost_model.py. Reports are tables, or one JSON object with
`--json`; `--plot DIR` writes the PNGs of bench/plots.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mesh.errors import WaferError

PROFILE_SCHEDULES = ("psum", "ring", "ktree")
# Grids the autotuner tries (rows x columns, clipped to the wafer): a few per side, chosen so a
# whole search stays under a minute; rows split D, columns split heads, F and V.
AUTOTUNE_ROWS = (360, 480, 750)
AUTOTUNE_COLS = (96, 128, 240, 360)
COMPARE_GRIDS = ("360x360", "480x96", "360x240", "750x128")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b", help="model preset (default: llama3-8b)")
    p.add_argument("--wafer", default="wse2", help="wafer spec: wse2 or wse3 (default: wse2)")
    p.add_argument("--grid", default="360x360", help="RxC cores per stage, or 'auto' for the fastest that fits")
    p.add_argument("--schedule", choices=PROFILE_SCHEDULES, default="ktree", help="all-reduce schedule")
    p.add_argument("--groups", type=int, default=None, help="K-tree groups per mesh axis (default ~sqrt)")
    p.add_argument("--batch", type=int, default=1, help="decode slots (default 1)")
    p.add_argument("--context", type=int, default=4096, help="KV positions per sequence (default 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="storage of weights and KV cache (default bfloat16, as the published figures)")
    p.add_argument("--compare-layouts", action="store_true", help="rank grids and schedules for the model")
    p.add_argument("--published", action="store_true", help="predicted vs published decode figures")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to DIR")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    return config, SPECS[args.wafer], Schedule(args.schedule)


def autotune_candidates(spec):
    from mesh.executors import Grid
    rows = sorted({min(r, spec.max_rows) for r in AUTOTUNE_ROWS})
    cols = sorted({min(c, spec.max_cols) for c in AUTOTUNE_COLS})
    return [Grid(r, c) for r in rows for c in cols]


def _autotune(config, spec, schedule, args):
    from model.profile import autotune_grid
    candidates = autotune_candidates(spec)
    _progress(f"autotuning {config.name} on {spec.name}: {len(candidates)} grids ...")
    return autotune_grid(config, spec, schedule, args.batch, args.context, args.dtype, candidates, args.groups)


def run(args) -> int:
    config, spec, schedule = _setup(args)
    from mesh.executors import Grid
    from model.profile import profile_layout

    if args.published:
        return _run_published(args)
    if args.compare_layouts:
        return _run_compare(config, spec, args)
    if args.grid == "auto":
        profile = _autotune(config, spec, schedule, args)[0]
    else:
        profile = profile_layout(config, Grid.parse(args.grid), spec, schedule, args.groups, args.batch,
                                 args.context, args.dtype)
    report = profile_report(profile)
    if args.plot:
        from bench.plots import write_plots
        report["plots"] = write_plots(profile, args.plot, _progress)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def profile_report(p) -> dict:
    """One profile as plain data (the --json object)."""
    kernels = {name: {"flops": k.flops, "read_bytes": k.read_bytes, "fabric_bytes": k.fabric_bytes, "calls": k.calls,
                          "compute_us": k.compute_s * 1e6, "memory_us": k.memory_s * 1e6, "fabric_us": k.fabric_s * 1e6,
                          "time_us": k.time_s * 1e6}
               for name, k in p.per_token.items()}
    calls = [{"scope": c.scope, "axis": c.axis, "axis_size": c.axis_size, "primitive": c.primitive, "bytes": c.nbytes,
                  "stages": c.stages, "hops": c.hops, "max_link_words": c.max_link_words, "messages": c.messages,
                  "time_us": c.cycles / p.spec.clock_hz * 1e6}
             for c in p.collectives_per_layer]
    return {
        "model": p.config.name, "wafer": p.spec.name, "grid": str(p.grid), "schedule": p.schedule.value,
        "groups": p.groups, "batch": p.batch, "context": p.context, "dtype": p.dtype,
        "sram_per_core_bytes": p.plan.bytes_by_kind(), "sram_budget_bytes": p.spec.sram_per_core,
        "layer_bytes_per_core": p.layer_bytes, "staging": dataclasses.asdict(p.staging),
        "layer_us": p.layer_s * 1e6, "token_us": p.token_s * 1e6, "tokens_per_s_per_request": p.tokens_per_s,
        "shares": p.shares(), "kernels_per_token": kernels, "collectives_per_layer": calls,
        "constants": {"clock_hz": p.spec.clock_hz, "core_flops_per_cycle": p.spec.core_flops_per_cycle,
                      "core_sram_bytes_per_cycle": p.spec.core_bytes_per_cycle, "hop_cycles": p.spec.hop_cycles,
                      "stage_cycles": p.spec.stage_cycles, "link_bytes_per_cycle": p.spec.link_bytes_per_cycle,
                      "wafer_hop_us": p.spec.wafer_hop_s * 1e6},
    }


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def format_report(r: dict) -> str:
    st, sh = r["staging"], r["shares"]
    by_kind = r["sram_per_core_bytes"]
    head = (f"{r['model']} on {r['wafer']}, {r['grid']} cores per stage, {r['schedule']} all-reduce, "
            f"batch {r['batch']}, context {r['context']}, {r['dtype']} weights and KV\n"
            f"SRAM per core (middle stage): weights {by_kind['weight']:,} B, KV {by_kind['kv']:,} B, buffers "
            f"{by_kind['buffer']:,} B of {r['sram_budget_bytes']:,} B; one layer {r['layer_bytes_per_core']:,} B\n"
            f"stages: {st['stages']} ({st['layers_per_stage']} layer(s) each), {st['stages_per_wafer']} per wafer, "
            f"{st['wafers']} wafer(s)\n"
            f"per layer {r['layer_us']:.2f} us, per token {r['token_us']:.1f} us -> "
            f"{r['tokens_per_s_per_request']:,.0f} tokens/s per request; time bound by compute {sh['compute']:.0%}, "
            f"SRAM {sh['memory']:.0%}, fabric {sh['fabric']:.0%}")
    kern = _table(["kernel (per token)", "FLOPs/core", "read B/core", "sent B/core", "calls", "compute us",
                   "memory us", "fabric us", "time us"],
                  [[n, f"{k['flops']:,}", f"{k['read_bytes']:,}", f"{k['fabric_bytes']:,}", k["calls"],
                    f"{k['compute_us']:.2f}", f"{k['memory_us']:.2f}", f"{k['fabric_us']:.2f}", f"{k['time_us']:.2f}"]
                   for n, k in r["kernels_per_token"].items()])
    calls = _table(["collective (one layer)", "axis", "n", "prim", "bytes", "stages", "hops", "link words",
                    "messages", "us"],
                   [[c["scope"], c["axis"], c["axis_size"], c["primitive"], c["bytes"], c["stages"], c["hops"],
                     c["max_link_words"], c["messages"], f"{c['time_us']:.2f}"] for c in r["collectives_per_layer"]])
    return f"{head}\n\n{kern}\n\n{calls}"


def _run_compare(config, spec, args) -> int:
    from kernels.allreduce import Schedule
    from mesh.executors import Grid
    from model.profile import profile_layout

    grids = [Grid.parse(g) for g in COMPARE_GRIDS]
    if args.grid != "auto" and Grid.parse(args.grid) not in grids:
        grids.insert(0, Grid.parse(args.grid))
    grids = [g for g in grids if g.rows <= spec.max_rows and g.cols <= spec.max_cols]
    _progress(f"comparing {len(grids)} grids x {len(Schedule)} schedules for {config.name} on {spec.name} ...")
    rows, skipped = [], []
    for g in grids:
        for s in Schedule:
            try:
                p = profile_layout(config, g, spec, s, args.groups, args.batch, args.context, args.dtype)
            except WaferError as e:
                skipped.append({"grid": str(g), "schedule": s.value, "reason": str(e)})
                continue
            rows.append(p)
    rows.sort(key=lambda p: p.token_s)
    ranked = [{"rank": i + 1, "grid": str(p.grid), "schedule": p.schedule.value,
               "tokens_per_s_per_request": p.tokens_per_s, "layer_us": p.layer_s * 1e6, "wafers": p.staging.wafers,
               "stages": p.staging.stages, "shares": p.shares()} for i, p in enumerate(rows)]
    if args.json:
        print(json.dumps({"model": config.name, "wafer": spec.name, "ranked": ranked, "not_fitting": skipped}))
        return 0
    print(_table(["rank", "grid", "schedule", "tok/s/req", "layer us", "stages", "wafers", "fabric share"],
                 [[r["rank"], r["grid"], r["schedule"], f"{r['tokens_per_s_per_request']:,.0f}",
                   f"{r['layer_us']:.2f}", r["stages"], r["wafers"], f"{r['shares']['fabric']:.0%}"] for r in ranked]))
    for s in skipped:
        print(f"not fitting: {s['grid']} {s['schedule']}: {s['reason']}")
    return 0


def _run_published(args) -> int:
    from bench.published import published_table
    rows = published_table(args, _progress)
    if args.json:
        print(json.dumps({"rows": rows}))
        return 0
    print(_table(["figure", "published", "predicted", "ratio", "setup"],
                 [[r["figure"], r["published"], r["predicted"], r["ratio"], r["setup"]] for r in rows]))
    print()
    for r in rows:
        print(f"- {r['figure']}: {r['comment']}")
    return 0
