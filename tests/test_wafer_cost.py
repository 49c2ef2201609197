"""The cost model held to published setups: WaferLLM's decode presets, the per-layer accounting
its benchmark used, hand-counted routing stages and hops, and multi-wafer staging."""

import json

import jax
import jax.numpy as jnp
import pytest

from bench.published import CALIBRATION_CELLS, constants_note, waferllm_rows
from kernels.allreduce import Schedule, allreduce
from mesh.axes import COL
from mesh.cost_model import kernel_times, price_calls
from mesh.executors import Grid
from mesh.staging import plan_staging
from mesh.trace import trace_program
from mesh.wafer import CALIBRATED, WSE2, WSE3, emulated_spec
from model.config import TINY_LLAMA, WAFERLLM_PRESETS, preset, waferllm_config
from model.trace_decode import Accounting, kernel_of, profile_layout, stage_bytes, trace_decode_step, with_layers
from model.wafer_decode import MeshOptions
from model.wafer_layout import WaferLayout

BIG = emulated_spec(1 << 40)

# MeshInfra/WaferLLM Decode/WSE-2/model_config/{llama8B,qwen72B}_4k_1_{P}.json:
# (P, dim, ffn_dim, seq_len, layer_num); n_heads = n_kv_heads = 1, head_dim = dim.
WAFERLLM_JSON = {
    "waferllm-llama3-8b": [(420, 4200, 14700, 4200, 32), (540, 4320, 14580, 4320, 32), (660, 4620, 14520, 4620, 32)],
    "waferllm-qwen2-72b": [(420, 8400, 29820, 4200, 80), (540, 8640, 29700, 4320, 80), (660, 8580, 29700, 4620, 80)],
}


@pytest.mark.parametrize("name", sorted(WAFERLLM_JSON))
def test_waferllm_presets_match_its_json_files(name):
    for side, dim, ffn, seq, layers in WAFERLLM_JSON[name]:
        c = waferllm_config(preset(name), side)
        assert (c.dim, c.ffn_dim, c.max_seq_len, c.n_layers) == (dim, ffn, seq, layers), side
        assert (c.n_heads, c.n_kv_heads, c.head_dim) == (1, 1, dim)


def test_waferllm_presets_are_one_head_of_the_model_width():
    assert [c.name for c in WAFERLLM_PRESETS] == ["waferllm-llama3-8b", "waferllm-llama2-13b",
                                                  "waferllm-codellama-34b", "waferllm-qwen2-72b"]
    for c in WAFERLLM_PRESETS:
        assert (c.n_heads, c.n_kv_heads, c.head_dim, c.max_seq_len) == (1, 1, c.dim, 4096)
        assert not c.qkv_bias
    # The published models' widths, layers: 13B 5120/13824/40, 34B 8192/22016/48.
    assert [(c.dim, c.ffn_dim, c.n_layers) for c in WAFERLLM_PRESETS[1:3]] == [(5120, 13824, 40), (8192, 22016, 48)]


def test_per_layer_accounting_is_one_layer_times_layers():
    """TINY_LLAMA cut to 3 layers on 2x4: per-layer accounting = (2-layer trace - 1-layer trace) x 3,
    with no embedding, LM head, sampling or hand-off; full accounting costs more."""
    three = with_layers(TINY_LLAMA, 3)
    opts = MeshOptions(Schedule.KTREE)
    one, two = (sum(k.time_s for k in kernel_times(trace_decode_step(WaferLayout(with_layers(three, n), Grid(2, 4),
                                                                                             64), 1, opts, "float32"),
                                                      BIG, kernel_of).values()) for n in (1, 2))
    p = profile_layout(three, Grid(2, 4), BIG, Schedule.KTREE, context=64, dtype="float32",
                       accounting=Accounting.PER_LAYER)
    assert p.token_s == pytest.approx(3 * (two - one))
    assert p.token_s == pytest.approx(3 * p.layer_s)
    assert not {"embed", "lm_head", "sample"} & set(p.per_token) and p.handoff_s == 0
    full = profile_layout(three, Grid(2, 4), BIG, Schedule.KTREE, context=64, dtype="float32")
    assert full.token_s > p.token_s and full.accounting is Accounting.FULL


def test_ktree_420_stages_and_hops_by_hand():
    """WaferLLM's 420-core axis in 20 groups of 21 (roots at 10, 31, ..., 409; top root 220).
    Groups: 10 steps toward the root from each end, rightward and leftward one after the other: 20
    stages of 1 hop. Roots: 10 steps from the left end, 9 from the right: 19 stages of 21 hops.
    The broadcast retraces them: 78 stages, 2 x (20 + 19 x 21) = 838 hops. A one-word message
    crosses link 210->211 twice (group 10's chain and the roots' chain 199 -> 220)."""
    t = trace_program(lambda x: allreduce(x, COL, Schedule.KTREE, 20), Grid(1, 420),
                      (jax.ShapeDtypeStruct((1,), jnp.float32),), ("x",))
    (call,) = price_calls(t.collectives, WSE2)
    assert (call.stages, call.hops, call.max_link_words) == (78, 838, 2)
    assert call.cycles == 78 * WSE2.stage_cycles + 838 * WSE2.hop_cycles + 2


def test_wse3_core_peak_is_dense_and_twice_wse2():
    """A WSE-3 core does an 8-wide 16-bit FMAC per cycle, a WSE-2 core a 4-wide one: 16 and 8
    FLOP/cycle dense (the vendor's 125 PFLOP/s for WSE-3 counts sparsity and would make a WSE-3
    core ~16x a WSE-2 core)."""
    peak = lambda s: s.core_flops_per_cycle / s.compute_efficiency
    assert peak(WSE3) == pytest.approx(16) and peak(WSE2) == pytest.approx(8, rel=0.01)


def test_wafer_hand_off_from_system_io():
    """1.2 Tb/s of system I/O: 150 kB take 1 us, plus the assumed latency."""
    assert WSE3.wafer_hop_s(150_000) == pytest.approx(WSE3.wafer_latency_s + 1e-6)


@pytest.mark.parametrize("name, spec, grid, context, layers_per_stage, stages, per_wafer, wafers", [
    # Llama3-8B, 16-bit, on 360x360 regions: 11 layers per region, 4 regions (the first with the
    # embedding, the last with the LM head) of the 4 a WSE-2 holds: one wafer, as WaferLLM ran it.
    ("llama3-8b", WSE2, Grid(360, 360), 4096, 11, 4, 4, 1),
    # Llama-3.1-70B, 16-bit, 2048 positions, one region per WSE-3 (755x1170): 22 layers each, 80
    # layers on four wafers, as the vendor ran it.
    ("llama3.1-70b", WSE3, Grid(755, 1170), 2048, 22, 4, 1, 4),
])
def test_staging_matches_published_setups(name, spec, grid, context, layers_per_stage, stages, per_wafer, wafers):
    """Layers fill regions of a wafer, then more wafers; bytes from the layout's specs (no trace)."""
    cfg = preset(name)
    layout = WaferLayout(with_layers(cfg, 1), grid, context)
    st = plan_staging(cfg.name, cfg.n_layers, grid, spec, stage_bytes(layout, 1, "bfloat16"),
                      layout.d * grid.rows * 4)
    assert (st.layers_per_stage, st.stages, st.stages_per_wafer, st.wafers) == (
        layers_per_stage, stages, per_wafer, wafers)


def test_at_most_two_constants_calibrated_and_every_one_sourced():
    notes = constants_note()
    assert {n["constant"] for n in notes if n["calibrated"]} == set(CALIBRATED) == {"stage_cycles",
                                                                                    "compute_efficiency"}
    assert all(n["source"] for n in notes)
    assert CALIBRATION_CELLS == {("waferllm-llama3-8b", 420), ("waferllm-qwen2-72b", 420)}


def test_published_json_keeps_published_and_predicted(capsys, monkeypatch):
    """The CLI's plumbing (the rows themselves are priced in the slow test below)."""
    import bench.published
    from cli.main import main
    row = {"figure": "f", "published": 2699.9, "predicted": 2699.8, "ratio": 1.0, "cell": "calibrated",
           "setup": "s", "comment": "c"}
    monkeypatch.setattr(bench.published, "published_table", lambda progress: [row])
    assert main(["profile", "--published", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"] == [row] and len(d["constants"]) == len(constants_note())


@pytest.mark.slow
def test_waferllm_llama3_8b_cells_within_20_percent_and_trend():
    """Per-layer accounting of WaferLLM's own shapes: 420^2 is a calibration cell, 660^2 a
    prediction; both within +-20% of the published figure, and 420^2 faster than 660^2."""
    rows = waferllm_rows(lambda msg: None, models=("waferllm-llama3-8b",), sides=(420, 660))
    assert [r["cell"] for r in rows] == ["calibrated", "predicted"]
    assert all(0.8 <= r["predicted"] / r["published"] <= 1.2 for r in rows), rows
    assert rows[0]["predicted"] > rows[1]["predicted"]


def test_cli_per_layer_accounting(capsys):
    from cli.main import main
    assert main(["profile", "--model", "smollm2-135m", "--grid", "48x64", "--accounting", "per-layer", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["accounting"] == "per-layer" and "wafers" in d["staging"]
    assert d["token_us"] == pytest.approx(30 * d["layer_us"])  # 30 layers, nothing else
    assert not {"embed", "lm_head", "sample"} & set(d["kernels_per_token"])
