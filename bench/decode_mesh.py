"""The mesh half of `wafer bench decode --mesh RxC`: the wafer decoder timed beside the 1x1 step.

The single-device decoder, timed by bench/decode.py in the same run with the same prompts, steps
and repeats, is the 1x1 reference: the targets are ratios of step times on one machine.
"""

from __future__ import annotations

from bench.mesh_setup import MeshSetup
from bench.table import Row


def mesh_report(decoder, mesh_setup: MeshSetup, result, single) -> dict:
    """The mesh figures of a report: step time, its ratio to the 1x1 step, per-core SRAM."""
    return {
        "grid": str(mesh_setup.grid),
        "cores": mesh_setup.grid.cores,
        "executor": mesh_setup.executor.value,
        "schedule": decoder.opts.schedule.value,
        "schedule_auto": mesh_setup.schedule is None,
        "groups": mesh_setup.groups,
        "layout": "heads" if decoder.layout.seg == 1 else "full",
        "layout_mode": decoder.layout.mode.value,
        "head_segment": decoder.layout.seg,
        "useful_fraction": round(decoder.plan.useful_fraction, 4),
        "tok_per_s": round(result.tok_per_s, 2),
        "tok_per_s_runs": [round(r, 2) for r in result.runs_tok_per_s],
        "step_ms": round(1e3 / result.tok_per_s, 3),
        "single_step_ms": round(1e3 / single.tok_per_s, 3),
        "vs_single_step": round(single.tok_per_s / result.tok_per_s, 3),
        "compile_s": round(result.compile_s, 3),
        "tokens_match_single": result.tokens_row0 == single.tokens_row0,
        "sram_per_core_bytes": decoder.plan.bytes_by_kind(),
        "sram_per_core_total": decoder.plan.per_core_bytes,
    }


def mesh_rows(m: dict) -> list[Row]:
    """Table rows for the mesh figures."""
    sram = m["sram_per_core_bytes"]
    return [
        Row("mesh", f"{m['grid']} {m['executor']} {m['schedule']}{' (auto)' if m['schedule_auto'] else ''} {m['layout']} layout (segments of "
                    f"{m['head_segment']} columns, {m['useful_fraction']:.0%} not padding): "
                    f"{m['tok_per_s']:.1f} tok/s per sequence, "
                    f"{m['step_ms']:.2f} ms/step = {m['vs_single_step']:.2f}x the 1x1 step of "
                    f"{m['single_step_ms']:.2f} ms (compile {m['compile_s']:.1f} s; tokens "
                    f"{'match' if m['tokens_match_single'] else 'DIFFER from'} the 1x1 decoder)"),
        Row("SRAM/core", f"{m['sram_per_core_total'] / 1e6:.2f} MB = weights {sram['weight'] / 1e6:.2f} MB + "
                         f"KV {sram['kv'] / 1e6:.2f} MB + buffers {sram['buffer'] / 1e6:.3f} MB"),
    ]
