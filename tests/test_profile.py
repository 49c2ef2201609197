"""The layout profiler: hand-checked traces and costs, exact agreement with the compiled kernels,
full-size presets through make_jaxpr only, and the `wafer profile` command."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli.main import main
from kernels.allreduce import Schedule, allreduce
from kernels.mesh_gemv import mesh_gemv
from mesh.axes import COL, ROW
from mesh.cost_model import chain_steps, kernel_times, price_calls
from mesh.executors import Executor, Grid, make_core_mesh
from mesh.planner import plan_sram
from mesh.trace import trace_program
from mesh.errors import WaferError
from mesh.wafer import WSE2, WSE3, emulated_spec
from model.config import TINY_LLAMA, preset
from model.trace_decode import kernel_of, layout_specs, profile_layout, trace_decode_step
from model.wafer_decode import MeshOptions
from model.wafer_generate import WaferDecoder
from model.wafer_layout import LayoutMode, WaferLayout
from model.weights import init_random_params

BIG = emulated_spec(1 << 40)
HEADS = LayoutMode.HEADS


def _gemv_trace(schedule):
    """x[1, 3] @ W[3, 5] per core, reduced over ROW."""
    args = (jax.ShapeDtypeStruct((1, 3), jnp.float32), jax.ShapeDtypeStruct((3, 5), jnp.float32))
    program = functools.partial(mesh_gemv, reduce_axis=ROW, schedule=schedule)
    return trace_program(program, Grid(2, 2), args, ("input", "weight"))


@pytest.mark.parametrize("schedule", list(Schedule), ids=lambda s: s.value)
def test_gemv_2x2_by_hand(schedule):
    """Per core: 3x5 weights (60 B), 3 inputs (12 B), 2*3*5 = 30 FLOPs; the partial [1, 5] (20 B)
    crosses the 2 rows. K-tree on 2 cores: 0 -> 1 (reduce), then 1 -> 0 (broadcast), one hop each."""
    t = _gemv_trace(schedule)
    assert t.bytes_by_kind == {"weight": 60, "input": 12}
    assert t.flops_by_scope["mesh_gemv"] == 30
    pairs = [(c.primitive, c.pairs, c.hops, c.nbytes, c.level) for c in t.collectives]
    assert pairs == {
        Schedule.PSUM: [("psum", (), (), 20, 1)],
        Schedule.RING: [("ppermute", ((0, 1), (1, 0)), (1, 1), 20, 1)],
        Schedule.KTREE: [("ppermute", ((0, 1),), (1,), 20, 1), ("ppermute", ((1, 0),), (1,), 20, 2)],
    }[schedule]
    assert all(c.axis == ROW and c.axis_size == 2 for c in t.collectives)
    (call,) = price_calls(t.collectives, WSE2)
    # K-tree and the pipeline chain both: 2 stages, 2 hops, 5 words on each link. Ring: one stage,
    # one hop, 5 words each way.
    stages, hops = {Schedule.PSUM: (2, 2), Schedule.KTREE: (2, 2), Schedule.RING: (1, 1)}[schedule]
    assert (call.stages, call.hops, call.max_link_words) == (stages, hops, 5)
    assert call.cycles == stages * WSE2.stage_cycles + hops * WSE2.hop_cycles + 5


def test_ktree_routes_and_hops_by_hand():
    """9 cores, 3 groups {0,1,2} {3,4,5} {6,7,8} with roots 1, 4, 7; the top root is 4."""
    t = trace_program(lambda x: allreduce(x, COL, Schedule.KTREE), Grid(1, 9),
                      (jax.ShapeDtypeStruct((2,), jnp.float32),), ("x",))
    got = [(c.level, c.pairs) for c in t.collectives]
    assert got == [(1, ((0, 1), (3, 4), (6, 7))), (2, ((2, 1), (5, 4), (8, 7))), (3, ((1, 4),)), (4, ((7, 4),)),
                   (5, ((4, 1),)), (6, ((4, 7),)), (7, ((1, 0), (4, 3), (7, 6))), (8, ((1, 2), (4, 5), (7, 8)))]
    (call,) = price_calls(t.collectives, WSE2)
    # 8 stages; longest hops 1, 1, 3, 3, 3, 3, 1, 1; link 1->4 carries the 2 words once each way
    # per phase, links 3->4 carry a level-1 and a level-2 message: 2 messages of 2 words.
    assert (call.stages, call.hops, call.max_link_words, call.messages) == (8, 16, 4, 16)
    assert call.cycles == 8 * WSE2.stage_cycles + 16 * WSE2.hop_cycles + 4


def test_ring_hops_by_hand():
    """4 cores in a line: 3 shifts of 0->1->2->3 plus the wrap-around 3->0 (3 hops back)."""
    t = trace_program(lambda x: allreduce(x, ROW, Schedule.RING), Grid(4, 1),
                      (jax.ShapeDtypeStruct((1,), jnp.float32),), ("x",))
    assert [c.hops for c in t.collectives] == [(1, 1, 1, 3)] * 3
    (call,) = price_calls(t.collectives, WSE2)
    # Every link carries 3 one-word messages (one per shift), rightward and leftward alike.
    assert (call.stages, call.hops, call.max_link_words) == (3, 9, 3)


def test_segmented_ktree_hops_by_hand():
    """8 cores in 2 segments of 4, 2 groups each ({0,1} {2,3} roots 1, 3; top 3), both segments at
    once: reduce 0->1 2->3 (and 4->5 6->7), 1->3 (5->7); broadcast back 3->1, then 1->0 3->2."""
    t = trace_program(lambda x: allreduce(x, COL, Schedule.KTREE, groups=2, segment=4), Grid(1, 8),
                      (jax.ShapeDtypeStruct((2,), jnp.float32),), ("x",))
    assert [(c.level, c.pairs, c.segment) for c in t.collectives] == [
        (1, ((0, 1), (2, 3), (4, 5), (6, 7)), 4), (2, ((1, 3), (5, 7)), 4), (3, ((3, 1), (7, 5)), 4),
        (4, ((1, 0), (3, 2), (5, 4), (7, 6)), 4)]
    (call,) = price_calls(t.collectives, WSE2)
    # 4 stages, longest hops 1, 2, 2, 1; link 2->3 carries 2->3 and 1->3 (2 messages of 2 words);
    # 12 messages in all; no route leaves its segment (none crosses link 3->4).
    assert (call.stages, call.hops, call.max_link_words, call.messages, call.segment) == (4, 6, 4, 12, 4)
    assert call.cycles == 4 * WSE2.stage_cycles + 6 * WSE2.hop_cycles + 2 * 8 / WSE2.link_bytes_per_cycle
    assert all(abs(s // 4 - d // 4) == 0 for c in t.collectives for s, d in c.pairs)


def test_segmented_psum_priced_over_its_segment():
    """A psum segmented to 3 of 9 cores: the pipeline chain over 3 cores (2 + 2 stages), 3 copies."""
    t = trace_program(lambda x: allreduce(x, COL, Schedule.PSUM, segment=3), Grid(1, 9),
                      (jax.ShapeDtypeStruct((1,), jnp.float32),), ("x",))
    (c,) = t.collectives
    assert (c.primitive, c.axis_size, c.segment, c.line, c.segments) == ("psum", 9, 3, 3, 3)
    (call,) = price_calls(t.collectives, WSE2)
    assert (call.stages, call.hops, call.messages) == (2, 2, 3 * 4)


def test_pipeline_chain_by_hand():
    assert chain_steps(5) == [[(0, 1), (4, 3)], [(1, 2), (3, 2)], [(2, 1), (2, 3)], [(1, 0), (3, 4)]]
    assert chain_steps(2) == [[(0, 1)], [(1, 0)]]


def test_tiny_model_sram_by_hand_equals_planner_and_placed():
    """TINY_LLAMA (D 64, F 160, 4 heads / 2 KV heads of 16, V 512, 2 layers, untied) on 2x2,
    batch 1, 64 positions: per core d 32, 1 KV head, 2 query heads, f 80, v 256, s 32 + 1 slot."""
    per_layer = 32 + 32 * 64 + 32 * 32 + 32 + 32 * 160 + 80 * 32  # norms, qkv, o, gate_up, down
    weights = 4 * (2 * per_layer + 32 + 32 * 256 + 256 * 32)  # + final norm, lm, embed
    kv = 4 * 2 * 2 * (33 * 16)
    assert (weights, kv) == (152192, 8448)
    layout = WaferLayout(TINY_LLAMA, Grid(2, 2), 64)
    trace = trace_decode_step(layout, 1, MeshOptions(Schedule.KTREE))
    assert trace.bytes_by_kind["weight"] == weights and trace.bytes_by_kind["kv"] == kv
    plan = plan_sram(layout_specs(layout, 1, "float32"), 2, 2, BIG).bytes_by_kind()
    assert (plan["weight"], plan["kv"]) == (weights, kv)
    dec = WaferDecoder(init_random_params(TINY_LLAMA), TINY_LLAMA, make_core_mesh(Grid(2, 2), Executor.DEVICES), 1, 64)
    placed = {}
    for a in jax.tree.leaves((dec.tiles, dec.k_cache, dec.v_cache)):
        for shard in a.addressable_shards:
            placed[shard.device] = placed.get(shard.device, 0) + shard.data.nbytes
    assert set(placed.values()) == {weights + kv}


HLO_OPS = {"all-reduce": ("psum", "pmax", "pmin"), "collective-permute": ("ppermute",), "all-gather": ("all_gather",)}


def _hlo_collectives(text: str) -> dict[str, tuple[int, int]]:
    """(count, bytes) per collective op in compiled HLO text. All-reduce and collective-permute
    results have their operand's size (compiled HLO prints operands without their types); the
    greedy step has no all-gather."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2}
    out = {}
    for op in HLO_OPS:
        count = nbytes = 0
        for m in re.finditer(rf"= (\S+|\([^)]*\)) {op}(?:-start)?\(", text):
            count += 1
            for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                nbytes += sizes[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        out[op] = (count, nbytes)
    return out


def _hlo_group_sizes(text: str) -> list[int]:
    """Per all-reduce in compiled HLO, the size of its largest replica group."""
    sizes = []
    for m in re.finditer(r"all-reduce(?:-start)?\(.*?replica_groups=(\{\{[\d,{}]*\}\}|\[\d+,(\d+)\]<=\[[\d,]+\])", text):
        if m.group(2):
            sizes.append(int(m.group(2)))
        else:
            sizes.append(max(len(g.split(",")) for g in re.findall(r"\{([\d,]+)\}", m.group(1))))
    return sizes


@pytest.mark.parametrize("grid, schedule", [("2x2", Schedule.KTREE), ("2x4", Schedule.PSUM), ("4x2", Schedule.RING),
                                            ("2x6", Schedule.KTREE), ("2x6", Schedule.PSUM)],
                         ids=lambda v: getattr(v, "value", v))
def test_collectives_equal_compiled_hlo(grid, schedule):
    """The trace's collectives, counted and sized, are exactly those of the devices executor's
    compiled step (XLA CPU keeps every one of them: no combining at these sizes). 2x4 and 2x6 have
    more columns than query heads: the full-grid layout (head dims over segments of 2 and 3
    columns), whose scores are summed by segmented all-reduces; with psum, the compiled replica
    groups are the traced segments."""
    g = Grid.parse(grid)
    dec = WaferDecoder(init_random_params(TINY_LLAMA), TINY_LLAMA, make_core_mesh(g, Executor.DEVICES), 2, 64,
                       MeshOptions(schedule))
    assert dec.layout.seg == {"2x2": 1, "2x4": 2, "4x2": 1, "2x6": 3}[grid]
    dec.compile()
    text = dec._compiled_step.as_text()
    hlo = _hlo_collectives(text)
    trace = trace_decode_step(dec.layout, 2, MeshOptions(schedule))
    counts, nbytes = trace.collective_counts(), trace.collective_bytes()
    for op, prims in HLO_OPS.items():
        assert hlo[op] == (sum(counts.get(p, 0) for p in prims), sum(nbytes.get(p, 0) for p in prims)), op
    assert hlo["collective-permute"][0] > 0 or schedule is Schedule.PSUM
    segmented = [c for c in trace.collectives if c.segment]
    assert bool(segmented) == (dec.layout.seg > 1) and {c.segment for c in segmented} <= {dec.layout.seg}
    if schedule is Schedule.PSUM:
        assert sorted(_hlo_group_sizes(text)) == sorted(c.line for c in trace.collectives if c.primitive in HLO_OPS["all-reduce"])


def test_full_layout_planner_traced_and_placed_bytes_agree():
    """TINY_LLAMA on 2x6, full-grid: per core d 32, one KV head's 6 dims (16 over 3 columns, rounded
    to whole rotary pairs), 2 query heads, f 27, v 86, s 32 + 1 slot: by hand, planned, traced, placed."""
    layout = WaferLayout(TINY_LLAMA, Grid(2, 6), 64)
    assert (layout.seg, layout.kc, layout.gc, layout.hc, layout.f, layout.v) == (3, 1, 2, 6, 27, 86)
    qkv = (2 + 2) * 6
    per_layer = 32 + 32 * qkv + 2 * 6 * 32 + 32 + 32 * 2 * 27 + 27 * 32
    weights = 4 * (2 * per_layer + 32 + 32 * 86 + 86 * 32)
    kv = 4 * 2 * 2 * (33 * 6)
    trace = trace_decode_step(layout, 1, MeshOptions(Schedule.RING))
    assert (trace.bytes_by_kind["weight"], trace.bytes_by_kind["kv"]) == (weights, kv)
    plan = plan_sram(layout_specs(layout, 1, "float32"), 2, 6, BIG).bytes_by_kind()
    assert (plan["weight"], plan["kv"]) == (weights, kv)
    dec = WaferDecoder(init_random_params(TINY_LLAMA), TINY_LLAMA, make_core_mesh(Grid(2, 6), Executor.DEVICES), 1, 64)
    placed = {}
    for a in jax.tree.leaves((dec.tiles, dec.k_cache, dec.v_cache)):
        for shard in a.addressable_shards:
            placed[shard.device] = placed.get(shard.device, 0) + shard.data.nbytes
    assert set(placed.values()) == {weights + kv}


@pytest.mark.parametrize("grid, full_at_least", [("360x360", 0.87), ("420x420", 0.84)])
def test_llama3_8b_useful_fraction_full_vs_heads(grid, full_at_least):
    """Llama3-8B layers, bf16, context 4096: the heads layout holds heads on 32 columns and
    zeros on the rest (under 1/3 useful); the full-grid layout puts head dims on every segment. Its
    ceiling here is the rounding of D = 4096 over the rows (4096/4320 = 0.948 on 360 rows,
    4096/4200 on 420): no layout with equal tiles per core passes it. (A middle stage of 11
    layers, with every head dimension rounded only to whole dims per column, fused q|k|v rounded
    once, still holds 0.932 on 360 and 0.949 on 420: the cache's rows and scratch slot and F's
    columns round too; model/wafer_layout.py, "Where the padding lies".)"""
    useful = {}
    for mode in (LayoutMode.HEADS, LayoutMode.FULL):
        layout = WaferLayout(dataclass_layers(preset("llama3-8b"), 1), Grid.parse(grid), 4096, mode=mode)
        specs = [s for s in layout_specs(layout, 1, "bfloat16") if s.name.startswith("layers.")
                 or s.kind.value == "buffer"]  # a middle stage's tensors, as the profile plans them
        useful[mode] = plan_sram(specs, layout.grid.rows, layout.grid.cols, BIG,
                                 layout.useful_bytes(specs)).useful_fraction
    assert useful[LayoutMode.HEADS] < 0.35 and useful[LayoutMode.FULL] >= full_at_least
    assert useful[LayoutMode.FULL] < 4096 / (layout.d * layout.grid.rows)


def test_llama3_8b_useful_bytes_hand_count():
    """The useful bytes of one Llama3-8B layer on 360x360 (full-grid: 8 segments of 45 columns,
    one KV group each, no replica), counted by hand from the model's real extents: weights and
    cache (bf16) once each, the norms and the residual buffer once per column (replicated over
    COL), the qkv, gate_up and logits buffers once per row, the scores buffer on every column
    (each of a segment's columns holds its 4 query heads' scores). Buffers count without their
    rounding, like the weights (mesh/planner.py: `SramPlan.useful_fraction`). The activations
    between kernels (residual, qkv, gate_up) are bf16 like the weights; scores and logits float32."""
    D, F, V, N, K, H, S, R, C = 4096, 14336, 128256, 32, 8, 128, 4096, 360, 360
    layout = WaferLayout(dataclass_layers(preset("llama3-8b"), 1), Grid(R, C), S, mode=LayoutMode.FULL)
    assert (layout.seg, layout.segments, layout.rep, layout.nc) == (45, 8, 1, 4)
    specs = [s for s in layout_specs(layout, 1, "bfloat16") if s.name.startswith("layers.")
             or s.kind.value == "buffer"]
    weights = 2 * D * C + D * (N + 2 * K) * H + N * H * D + D * 2 * F + F * D
    cache = 2 * K * S * H
    activations = D * C + (N + 2 * K) * H * R + 2 * F * R  # residual, qkv, gate_up
    scores_logits = 4 * C * S + V * R
    assert layout.useful_bytes(specs) == 2 * (weights + cache + activations) + 4 * scores_logits


def test_one_layer_scaling_equals_full_trace():
    """profile_layout traces 1 and 2 layers and scales; a full 3-layer trace gives the same totals."""
    cfg = dict(TINY_LLAMA.__dict__)
    cfg.update(name="tiny-3", n_layers=3)
    three = type(TINY_LLAMA)(**cfg)
    p = profile_layout(three, Grid(2, 4), BIG, Schedule.KTREE, context=64, dtype="float32")
    full = kernel_times(trace_decode_step(WaferLayout(three, Grid(2, 4), 64), 1, MeshOptions(Schedule.KTREE)), BIG,
                        kernel_of)
    for name, k in full.items():
        got = p.per_token[name]
        assert (got.flops, got.read_bytes, got.calls) == (k.flops, k.read_bytes, k.calls), name
        assert got.fabric_s == pytest.approx(k.fabric_s) and got.time_s == pytest.approx(k.time_s), name


def test_llama3_8b_full_wafer_grid():
    """360x360, whole heads per column (LayoutMode.HEADS; tests/test_wafer_cost.py stages the
    automatic choice): two layers per stage fit 48 KiB; traced, nothing allocated."""
    p = profile_layout(preset("llama3-8b"), Grid(360, 360), WSE2, Schedule.KTREE, mode=HEADS)
    assert p.staging.layers_per_stage == 2 and p.plan.per_core_bytes <= 48 * 1024
    # d = ceil(4096/360) = 12; 360 // 8 = 45 columns per KV head allow gc = 1 (rep 4): one copy of
    # a KV head and one query head per column, QKV [12, (1+2)*128] and O [128, 12], in bf16.
    assert p.plan.bytes_by_kind()["weight"] == 2 * 2 * (12 + 12 * 384 + 128 * 12 + 12 + 12 * 2 * 40 + 40 * 12)
    assert 100 < p.tokens_per_s < 1e5
    psum = profile_layout(preset("llama3-8b"), Grid(360, 360), WSE2, Schedule.PSUM, mode=HEADS)
    assert psum.layer_s > p.layer_s  # the pipeline chain pays 360 routing stages per reduction


@pytest.mark.parametrize("name, f, bias", [("qwen2-72b", 30, True), ("llama3.1-70b", 29, False)])
def test_70b_class_traced_at_750x990_fits_with_split_groups(name, f, bias):
    """G = 8: whole KV groups need ceil(8192/750) x (2G+2)H of QKV and O per core, over 48 KiB on
    any grid; split over 8 columns each (gc 1), a layer's tiles fit twice over (whole heads per
    column, LayoutMode.HEADS)."""
    cfg = preset(name)
    layout = WaferLayout(dataclass_layers(cfg, 1), Grid(750, 990), 4096, mode=HEADS)
    assert (layout.kc, layout.gc, layout.rep, layout.d, layout.f) == (1, 1, 8, 11, f)
    t = trace_decode_step(layout, 1, MeshOptions(Schedule.KTREE), "bfloat16")
    assert t.bytes_by_kind["weight"] == sum(s.local_bytes for s in layout_specs(layout, 1, "bfloat16")
                                             if s.kind.value == "weight")
    assert {c.axis_size for c in t.collectives} == {750, 990}
    whole = WaferLayout(dataclass_layers(cfg, 1), Grid(750, 990), 4096, split_groups=False)
    assert sum(s.local_bytes for s in layout_specs(whole, 1, "bfloat16") if s.name.startswith("layers.")) > 48 * 1024
    p = profile_layout(cfg, Grid(750, 990), WSE2, mode=HEADS)
    # One layer per core in bf16: norms, QKV [11, 384] (+ bias), O [128, 11], gate_up, down; and
    # K and V of one KV head at ceil(4096/750) = 6 positions + the scratch slot.
    weights = 2 * (11 + 11 * 384 + (384 if bias else 0) + 128 * 11 + 11 + 11 * 2 * f + f * 11)
    assert p.layer_bytes == weights + 2 * 2 * 7 * 128
    assert p.staging.layers_per_stage == 2 and p.plan.per_core_bytes <= 48 * 1024


def test_405b_fits_only_the_full_wse3_wafer():
    """Llama-3.1-405B (D 16384, F 53248, N 128, K 8), whole heads per column (LayoutMode.HEADS): a
    layer needs the whole 755x1170 wafer."""
    cfg = preset("llama3.1-405b")
    with pytest.raises(WaferError, match="does not fit"):
        profile_layout(cfg, Grid(360, 360), WSE3, mode=HEADS)
    p = profile_layout(cfg, Grid(755, 1170), WSE3, mode=HEADS)
    layout = WaferLayout(dataclass_layers(cfg, 1), Grid(755, 1170), 4096, mode=HEADS)
    # 1170 columns over 8 KV heads: rep = G = 16, one query head each; d = ceil(16384/755) = 22,
    # f = ceil(53248/1170) = 46.
    assert (layout.kc, layout.gc, layout.rep, layout.d, layout.f) == (1, 1, 16, 22, 46)
    assert p.staging.layers_per_stage == 1 and p.staging.wafers == 126
    assert p.plan.per_core_bytes <= 48 * 1024 and p.tokens_per_s > 0


def dataclass_layers(cfg, n):
    import dataclasses
    return dataclasses.replace(cfg, n_layers=n)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "gpt5"], "unknown model preset"),
    (["--grid", "3x"], "expected RxC"),
    (["--wafer", "wse9"], "unknown wafer"),
    (["--grid", "800x800"], "exceeds wse2"),
    (["--model", "qwen2-72b", "--grid", "96x96"], "does not fit"),
    (["--model", "qwen2-72b", "--grid", "96x96", "--schedule", "auto"], "--schedule auto: no schedule fits"),
    (["--batch", "0"], "--batch must be positive"),
])
def test_cli_errors_are_one_line(capsys, argv, fragment):
    rc, _, err = run_cli(capsys, "profile", *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wafer: error:") and fragment in lines[0], err


def test_schedule_auto_takes_the_schedule_with_the_shortest_predicted_token(capsys):
    rc, out, _ = run_cli(capsys, "profile", "--model", "smollm2-135m", "--grid", "48x64", "--schedule", "auto",
                         "--json")
    assert rc == 0
    d = json.loads(out)
    choice = d["schedule_choice"]
    assert set(choice["token_us"]) == {s.value for s in Schedule} and choice["not_fitting"] == {}
    assert d["schedule"] == choice["chosen"] == min(choice["token_us"], key=choice["token_us"].get)
    assert d["token_us"] == pytest.approx(choice["token_us"][d["schedule"]])
    for s in Schedule:  # each figure is that schedule's own profile
        rc, out, _ = run_cli(capsys, "profile", "--model", "smollm2-135m", "--grid", "48x64", "--schedule", s.value,
                             "--json")
        assert rc == 0 and json.loads(out)["token_us"] == pytest.approx(choice["token_us"][s.value])
    rc, out, _ = run_cli(capsys, "profile", "--model", "smollm2-135m", "--grid", "48x64", "--schedule", "auto")
    assert rc == 0 and f"-> {d['schedule']}" in out


def test_cli_json_and_table(capsys):
    rc, out, _ = run_cli(capsys, "profile", "--model", "smollm2-135m", "--grid", "48x64", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["grid"] == "48x64" and d["schedule"] == "ktree"
    assert d["tokens_per_s_per_request"] == pytest.approx(1e6 / d["token_us"])
    assert sum(d["shares"].values()) == pytest.approx(1.0)
    assert set(d["kernels_per_token"]) >= {"attention", "mlp", "lm_head"}
    # 64 columns over 9 query heads: the full-grid layout (2 segments of 32 columns), not padding.
    assert d["layout"]["kind"] == "full" and d["layout"]["segment"] == 32 and d["useful_fraction"] > 0.8
    assert any(c["segment"] == 32 for c in d["collectives_per_layer"])
    rc, out, _ = run_cli(capsys, "profile", "--model", "smollm2-135m", "--grid", "48x64")
    assert rc == 0 and "tokens/s per request" in out and "layer1/mlp/mesh_gemv/allreduce" in out


def test_autotune_ranks_the_fitting_grids_and_counts_every_candidate():
    """`--grid auto`'s search: every candidate is profiled or refused, each reported to the
    progress bar (`on_candidate`), and the fitting ones come back fastest first."""
    from bench.autotune import autotune_grid
    seen = []
    found = autotune_grid(preset("smollm2-135m"), WSE2, Schedule.RING, 1, 4096, "bfloat16",
                          [Grid(48, 64), Grid(2, 2), Grid(64, 96)], on_candidate=lambda: seen.append(1))
    assert len(seen) == 3
    assert {str(p.grid) for p in found} == {"48x64", "64x96"}  # 2x2 cannot hold a layer
    assert [p.token_s for p in found] == sorted(p.token_s for p in found)
    with pytest.raises(WaferError, match="no candidate grid fits"):
        autotune_grid(preset("smollm2-135m"), WSE2, Schedule.RING, 1, 4096, "bfloat16", [Grid(2, 2)])
