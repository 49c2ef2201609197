"""Predicted vs published decode figures (DESIGN.md, "Reference facts"), produced by the profiler.

Every prediction is a profile of the project's own decode program (model/profile.py); nothing is
fitted to the published numbers. Where the project's layout cannot hold a model at all, the row
says so and why, instead of a ratio.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.allreduce import Schedule
from kernels.mesh_gemv import mesh_gemv
from mesh.axes import ROW
from mesh.cost_model import kernel_times
from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.trace import trace_program
from mesh.wafer import WSE2, WSE3
from model.config import preset
from model.profile import autotune_grid, profile_layout


def gemv_time_s(spec, grid: Grid, dim_in: int, dim_out: int, schedule: Schedule, dtype: str = "bfloat16") -> float:
    """One MeshGEMV y = x @ W, W[in_row, out_col], reduced over ROW: per-core time on `spec`."""
    i, o = -(-dim_in // grid.rows), -(-dim_out // grid.cols)
    program = functools.partial(mesh_gemv, reduce_axis=ROW, schedule=schedule)
    args = (jax.ShapeDtypeStruct((1, i), jnp.float32), jax.ShapeDtypeStruct((i, o), dtype))
    trace = trace_program(program, grid, args, lambda path: "weight" if path.startswith("[1]") else "input")
    return sum(k.time_s for k in kernel_times(trace, spec, lambda scope: "gemv").values())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _row(figure, published, predicted, setup, comment, ratio=None):
    if ratio is None and isinstance(predicted, (int, float)):
        ratio = predicted / published
    return {"figure": figure, "published": f"{published:,}" if isinstance(published, (int, float)) else published,
            "predicted": _fmt(predicted) if not isinstance(predicted, str) else predicted,
            "ratio": "-" if ratio is None else f"{ratio:.2f}", "setup": setup, "comment": comment}


def _fit_error(config, spec, batch, context, dtype) -> str:
    try:
        profile_layout(config, Grid(spec.max_rows, spec.max_cols), spec, Schedule.KTREE, None, batch, context, dtype)
    except WaferError as e:
        return str(e)
    return ""


def published_table(args, progress) -> list[dict]:
    from bench.profile import autotune_candidates

    batch, context, dtype = args.batch, args.context, args.dtype
    rows = []
    l8 = preset("llama3-8b")
    progress("profiling llama3-8b on wse2 360x360 ...")
    p = profile_layout(l8, Grid(360, 360), WSE2, Schedule.KTREE, None, batch, context, dtype)
    rows.append(_row("WaferLLM WSE-2 Llama3-8B decode tok/s/req", 2700, p.tokens_per_s,
                     f"360x360 ktree, {p.staging.stages} stages on {p.staging.wafers} wafers",
                     "Same grid as WaferLLM. Our layout gives each column whole KV-head groups: with 360 columns "
                     "and 8 KV heads, every column computes a full (G+2)H = 768-wide QKV slice (45x a flat split) "
                     "and reduces 768 words over rows, and one layer fills a 360x360 grid (16 GB of 16-bit weights "
                     "cannot fit 360*360*48 KiB = 6.4 GB), so the model spans "
                     f"{p.staging.wafers} wafers here; WaferLLM's per-request figure has no inter-wafer hops."))
    for spec, published, who in ((WSE2, 2700, "WaferLLM WSE-2"), (WSE3, 1800, "Cerebras CS-3 (Llama 3.1 8B)")):
        best = autotune_grid(l8, spec, Schedule.KTREE, batch, context, dtype, autotune_candidates(spec))[0]
        progress(f"autotuned llama3-8b on {spec.name}: {best.grid}")
        rows.append(_row(f"{who} 8B decode tok/s/req", published, best.tokens_per_s,
                         f"{spec.name} autotuned {best.grid} ktree, {best.staging.wafers} wafer(s)",
                         "Llama-3 8B shapes (3.1 differs only in rope scaling, which costs nothing at decode). "
                         f"Time shares: compute {best.shares()['compute']:.0%}, fabric {best.shares()['fabric']:.0%}, "
                         f"SRAM {best.shares()['memory']:.0%}; the per-column QKV width and f32 reductions make our "
                         "program heavier than a tuned wafer kernel, inter-wafer hand-offs add "
                         f"{best.staging.handoff_s * 1e6:.0f} us per token."))
    for name, spec, published, who in (("qwen2-72b", WSE2, 840, "WaferLLM WSE-2 Qwen2-72B"),
                                       ("llama3.1-70b", WSE3, 450, "Cerebras 4x CS-3 Llama 3.1 70B")):
        progress(f"checking {name} on {spec.name} ...")
        reason = _fit_error(preset(name), spec, batch, context, dtype)
        rows.append(_row(f"{who} decode tok/s/req", published, "does not fit" if reason else "fits?", "any grid",
                         "Not comparable with this layout: a column holds at least one whole KV group, so a core "
                         "holds ceil(D/rows) x (2G+2)H of QKV and O weights: ceil(8192/750) x 2304 x 2 B = 50.7 KB "
                         "> 48 KiB on every grid. The profiler's error on the full wafer: " + reason))
    rows.append(_row("Cerebras CS-3 Llama 3.1 405B decode tok/s/req", 969, None, "-",
                     "No 405B preset; with D 16384 and the same whole-KV-group columns it could not fit either."))
    progress("MeshGEMV vs pipeline GEMV ...")
    # A 4096 x 4096 GEMV (Llama3-8B's width) on WaferLLM's 360x360 decode grid. The pipeline
    # reduction is how the cost model prices XLA's psum.
    ratio = gemv_time_s(WSE2, Grid(360, 360), 4096, 4096, Schedule.PSUM) / gemv_time_s(
        WSE2, Grid(360, 360), 4096, 4096, Schedule.KTREE)
    rows.append(_row("WaferLLM MeshGEMV speed-up over pipeline-reduction GEMV", "~4.6x", f"{ratio:.1f}x",
                     "4096x4096 GEMV, 360x360, wse2",
                     "The ratio follows from stage_cycles (20, an assumption): a chain pays 360 routing stages, "
                     "the K-tree 2x2x~sqrt(360) (our tree's rightward and leftward chains run one after the other).",
                     ratio=ratio / 4.6))
    return rows
