"""Reports of a layout profile (model/trace_decode.py): the --json object, its table, and the
per-core maps the plots draw (SRAM that is not padding, bytes sent over the fabric)."""

from __future__ import annotations

import dataclasses

import numpy as np

from mesh.axes import COL, ROW, layer_scope
from mesh.cost_model import sent_bytes_per_position
from model.trace_decode import LayoutProfile, trace_decode_step, with_layers
from model.wafer_decode import MeshOptions
from model.wafer_layout import WaferLayout


def profile_report(p: LayoutProfile) -> dict:
    """One profile as plain data (the --json object)."""
    kernels = {name: {"flops": k.flops, "read_bytes": k.read_bytes, "fabric_bytes": k.fabric_bytes, "calls": k.calls,
                          "compute_us": k.compute_s * 1e6, "memory_us": k.memory_s * 1e6, "fabric_us": k.fabric_s * 1e6,
                          "time_us": k.time_s * 1e6}
               for name, k in p.per_token.items()}
    calls = [{"scope": c.scope, "axis": c.axis, "axis_size": c.axis_size, "segment": c.segment,
              "primitive": c.primitive, "bytes": c.nbytes,
                  "stages": c.stages, "hops": c.hops, "max_link_words": c.max_link_words, "messages": c.messages,
                  "time_us": c.cycles / p.spec.clock_hz * 1e6}
             for c in p.collectives_per_layer]
    return {
        "model": p.config.name, "wafer": p.spec.name, "grid": str(p.grid), "schedule": p.schedule.value,
        "groups": p.groups, "batch": p.batch, "context": p.context, "dtype": p.dtype, "accounting": p.accounting.value,
        "sram_per_core_bytes": p.plan.bytes_by_kind(), "sram_budget_bytes": p.spec.sram_per_core,
        "useful_fraction": p.useful_fraction, "layout": _layout_report(p.stage_layout()),
        "layer_bytes_per_core": p.layer_bytes, "staging": dataclasses.asdict(p.staging),
        "layer_us": p.layer_s * 1e6, "token_us": p.token_s * 1e6, "tokens_per_s_per_request": p.tokens_per_s,
        "shares": p.shares(), "kernels_per_token": kernels, "collectives_per_layer": calls,
        "constants": {"clock_hz": p.spec.clock_hz, "core_flops_per_cycle": p.spec.core_flops_per_cycle,
                      "core_sram_bytes_per_cycle": p.spec.core_bytes_per_cycle, "hop_cycles": p.spec.hop_cycles,
                      "stage_cycles": p.spec.stage_cycles, "link_bytes_per_cycle": p.spec.link_bytes_per_cycle,
                      "compute_efficiency": p.spec.compute_efficiency,
                      "wafer_latency_us": p.spec.wafer_latency_s * 1e6, "io_bytes_per_s": p.spec.io_bytes_per_s},
    }


def _layout_report(layout: WaferLayout) -> dict:
    """How heads lie over the columns (model/wafer_layout.py)."""
    return {"mode": layout.mode.value, "kind": "heads" if layout.seg == 1 else "full", "segment": layout.seg,
            "segments": layout.segments, "kv_heads_per_column": layout.kc, "q_heads_per_kv_head": layout.gc,
            "kv_replicas": layout.rep, "head_dims_per_column": layout.hc}


def table(header: list[str], rows: list[list]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def format_report(r: dict) -> str:
    """The table form of `profile_report`'s object."""
    st, sh = r["staging"], r["shares"]
    by_kind = r["sram_per_core_bytes"]
    head = (f"{r['model']} on {r['wafer']}, {r['grid']} cores per stage, {r['schedule']} all-reduce, "
            f"batch {r['batch']}, context {r['context']}, {r['dtype']} weights and KV\n"
            f"SRAM per core (middle stage): weights {by_kind['weight']:,} B, KV {by_kind['kv']:,} B, buffers "
            f"{by_kind['buffer']:,} B of {r['sram_budget_bytes']:,} B; one layer {r['layer_bytes_per_core']:,} B; "
            f"useful (not padding) {r['useful_fraction']:.1%}\n"
            f"layout: {_layout_line(r['layout'])}\n"
            f"stages: {st['stages']} ({st['layers_per_stage']} layer(s) each), {st['stages_per_wafer']} per wafer, "
            f"{st['wafers']} wafer(s)\n"
            f"per layer {r['layer_us']:.2f} us, per token ({r['accounting']} accounting) {r['token_us']:.1f} us -> "
            f"{r['tokens_per_s_per_request']:,.0f} tokens/s per request; time bound by compute {sh['compute']:.0%}, "
            f"SRAM {sh['memory']:.0%}, fabric {sh['fabric']:.0%}")
    kern = table(["kernel (per token)", "FLOPs/core", "read B/core", "sent B/core", "calls", "compute us",
                  "memory us", "fabric us", "time us"],
                 [[n, f"{k['flops']:,}", f"{k['read_bytes']:,}", f"{k['fabric_bytes']:,}", k["calls"],
                   f"{k['compute_us']:.2f}", f"{k['memory_us']:.2f}", f"{k['fabric_us']:.2f}", f"{k['time_us']:.2f}"]
                  for n, k in r["kernels_per_token"].items()])
    calls = table(["collective (one layer)", "axis", "n", "seg", "prim", "bytes", "stages", "hops", "link words",
                   "messages", "us"],
                  [[c["scope"], c["axis"], c["axis_size"], c["segment"] or "", c["primitive"], c["bytes"], c["stages"],
                    c["hops"],
                    c["max_link_words"], c["messages"], f"{c['time_us']:.2f}"] for c in r["collectives_per_layer"]])
    choice = r.get("schedule_choice")
    if choice:  # --schedule auto
        tried = ", ".join(f"{k} {us:.1f} us" for k, us in choice["token_us"].items())
        skipped = "".join(f"; {k} does not fit" for k in choice["not_fitting"])
        head += f"\nschedule auto: {tried} a token{skipped} -> {choice['chosen']}"
    return f"{head}\n\n{kern}\n\n{calls}"


def _layout_line(lay: dict) -> str:
    if lay["kind"] == "heads":
        return (f"heads ({lay['mode']}): whole heads per column, {lay['kv_heads_per_column']} KV head(s) x "
                f"{lay['q_heads_per_kv_head']} query head(s) per column")
    return (f"full ({lay['mode']}): head dims over {lay['segments']} segments of {lay['segment']} columns, "
            f"{lay['head_dims_per_column']} dims of {lay['kv_heads_per_column']} KV head(s) x "
            f"{lay['q_heads_per_kv_head']} query head(s) per column, each KV head on {lay['kv_replicas']} segment(s)")


def sram_map(profile: LayoutProfile) -> tuple[np.ndarray, np.ndarray]:
    """Per-core bytes of a middle stage: (allocated [R, C], useful [R, C]: the part not padding).

    Every core allocates the same extents (the plan's specs); padding (D over rows, KV and query
    heads, F and V over columns, cache positions over rows) leaves some cores holding zeros. The
    useful part of each weight and KV tile follows from its spec's logical axes
    (`WaferLayout.real_elements`; a replicated KV head counts as useful on each of its columns,
    each needs its copy); a buffer's likewise (its rounding of D, V or the query heads is padding).
    """
    layout, g = profile.stage_layout(), profile.grid
    allocated = np.full((g.rows, g.cols), profile.plan.per_core_bytes, dtype=np.int64)
    useful = np.zeros((g.rows, g.cols), dtype=np.int64)
    for s in profile.plan.tensors:
        useful += layout.real_elements(s) * np.dtype(s.dtype).itemsize
    return allocated, useful


def fabric_map(profile: LayoutProfile) -> np.ndarray:
    """Bytes each core of one stage sends per token over its layers (and the head), [R, C]."""
    g = profile.grid
    layout = WaferLayout(with_layers(profile.config, 1), g, profile.context, mode=profile.mode)
    trace = trace_decode_step(layout, profile.batch, MeshOptions(profile.schedule, profile.groups), profile.dtype)
    out = np.zeros((g.rows, g.cols))
    for c in trace.collectives:
        weight = profile.staging.layers_per_stage if c.scope.startswith(f"{layer_scope(0)}/") else 1
        for pos, nbytes in sent_bytes_per_position(c).items():
            if c.axis == ROW:
                out[pos, :] += weight * nbytes
            elif c.axis == COL:
                out[:, pos] += weight * nbytes
    return out
