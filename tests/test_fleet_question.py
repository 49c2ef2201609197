"""Issue 14's question (bench/fleet_question.py, `wafer simulate --sweep question|sensitivity`):
equal-footprint sizing against hand-computed counts, the report's figures built from the simulated
unit capacities, the capacity search's rate cap, the sensitivity swing, and one-line CLI errors.
The wafer profile is replaced by fixed step times so no test traces the 70B model."""

import dataclasses
import math

import pytest

import bench.fleet as fleet
import bench.fleet_question as q
from mesh.errors import WaferError
from mesh.wafer import SPECS
from model.config import preset
from serve.costs import B200, H100, TRAINIUM2, MeasuredCost, WaferDecodeCost
from serve.events import Mode
from serve.simulator import SLO
from serve.workload import synthetic
from tests.helpers.cli_runner import assert_one_line_error, run_cli

LLAMA70 = preset("llama3.1-70b")
# Fixed wafer decode: 14 wafers a replica, 8 slots, 1 ms a step at batch 1 and 2 ms at 8.
WAFER = WaferDecodeCost(1e-3, 2e-3, 8, 14, "360x360", 4096)


@pytest.fixture
def fixed_wafer(monkeypatch):
    def wafer_decode(config, spec, grid, context, slots=None):
        return dataclasses.replace(WAFER, grid=grid, context=context)
    monkeypatch.setattr(q, "wafer_decode", wafer_decode)
    monkeypatch.setattr(fleet, "wafer_decode", wafer_decode)


def test_units_in_a_footprint_hand_counted():
    # DGX H100: 10.2 kW / 8 = 1.275 kW a GPU; a group of 8 is 10.2 kW; 1000 kW holds 98 (999.6 kW).
    assert q.Assumptions().chip_kw(H100) == pytest.approx(1.275)
    assert q.units_in(1000.0, 8 * 1.275) == 98
    # 14 CS-3 at 23 kW + 4 H100 = 322 + 5.1 = 327.1 kW a unit: 3 in 1000 kW (981.3 kW), not 4.
    unit = q.disaggregated_unit_kw(14, 4, 23.0, 1.275)
    assert unit == pytest.approx(327.1)
    assert q.units_in(1000.0, unit) == 3
    # DGX B200: 14.3 kW / 8 = 1.7875 kW; an exact fit is not lost to rounding.
    assert q.Assumptions().chip_kw(B200) == pytest.approx(1.7875)
    assert q.units_in(3 * 0.1 * 10, 0.1 * 10) == 3
    assert q.units_in(0.5, 1.0) == 0
    with pytest.raises(WaferError, match="positive power"):
        q.units_in(10.0, 0.0)


def test_power_figures_and_slo_of_the_assumptions():
    a = q.Assumptions(fast_speed=50.0, ttft_s=1.5)
    assert a.slo() == SLO(1.5, 0.02, 50.0)
    assert q.Assumptions(accelerator_kw=0.7).chip_kw(H100) == 0.7
    with pytest.raises(WaferError, match="trainium2 has no system power"):
        q.Assumptions().chip_kw(TRAINIUM2)
    # Power figures do not change a unit's simulation; everything else does.
    assert q.Assumptions(wafer_kw=30.0).sim_key() == q.Assumptions().sim_key()
    assert q.Assumptions(mfu=0.3).sim_key() != q.Assumptions().sim_key()
    assert q.Assumptions(link="efa1").sim_key("integrated") == q.Assumptions().sim_key("integrated")
    assert q.Assumptions(link="efa1").sim_key("disaggregated") != q.Assumptions().sim_key("disaggregated")
    assert q.Assumptions(chunked=True).sim_key("disaggregated") == q.Assumptions().sim_key("disaggregated")
    assert q.min_prefill(LLAMA70, H100) == 2 and q.min_prefill(LLAMA70, B200) == 1
    # 141 GB of weights and 8 caches of 4096 x 320 KiB: 4 H100s (288 GB usable) or 1 B200 (162 GB)
    # at least; groups double up to one 8-GPU node.
    assert q.integrated_groups(LLAMA70, H100, q.Assumptions()) == [4, 8]
    assert q.integrated_groups(LLAMA70, B200, q.Assumptions()) == [1, 2, 4, 8]
    assert q.integrated_groups(LLAMA70, H100, q.Assumptions(max_group=2)) == [4]
    assert q.question_jobs(LLAMA70, ["h100", "b200"], ["chat", "code"], q.Assumptions()) == 2 * ((2 + 3) + (4 + 3))


def test_a_unit_whose_step_misses_the_tpot_slo_serves_nothing_unsimulated():
    """4 H100s read 141 GB of weights at 4 x 3.35 TB/s x 0.8: 10.5 ms + 1 ms a step, over the
    10 ms TPOT of 100 tok/s; 8 H100s (6.3 + 1 ms) make it."""
    a = q.Assumptions()
    four, eight = (q.integrated_unit(LLAMA70, H100, g, "chat", a) for g in (4, 8))
    assert four.tpot_floor_s > 0.01 > eight.tpot_floor_s
    r = q.unit_capacity(four, "chat", 10, a)
    assert r["capacity_req_s"] == 0.0 and r["simulated"] is False and "TPOT SLO" in r["note"]


def test_capacity_stops_at_the_rate_cap():
    """A fleet that meets its SLOs at any rate: the search stops at `max_rate`, marked capped."""
    plan = fleet.measured(MeasuredCost({"fixed_s": 1e-4}, {"fixed_s": 1e-4}, {}, 8), Mode.INTEGRATED)
    rate, s = fleet.capacity(plan, lambda r: synthetic(20, r, 8, 4), SLO(10.0, 1.0), 1.0, max_rate=5.0)
    assert rate == 5.0 and s["capped"] is True
    assert q.max_rate(1000, q.Assumptions(ttft_s=2.0)) == 1000 / (q.SPAN_TTFTS * 2.0)


def test_capacity_bisects_below_the_rate_cap(monkeypatch):
    """Passing up to 6.5 req/s: from 5 with the cap at 7, 7 fails, so the bracket is [5, 7] (not
    [5, 10]) and bisection tries 6, 6.5, 6.75: 6.5. With the cap at 5, the start is capped."""
    tried = []

    def simulate(fleet_, workload, slo):
        tried.append(float(workload.name))
        good = 1.0 if float(workload.name) <= 6.5 else 0.0
        return type("R", (), {"summary": lambda self: {"slo_attainment": good, "goodput_req_s": 0.0,
                                                      "fast_tokens_s": 0.0}})()
    monkeypatch.setattr(fleet, "simulate", simulate)
    plan = fleet.measured(MeasuredCost({}, {}, {}, 8), Mode.INTEGRATED)

    def make(r):
        return synthetic(3, r, 8, 4, name=str(r))
    rate, s = fleet.capacity(plan, make, SLO(), 5.0, steps=3, max_rate=7.0)
    assert tried == [5.0, 7.0, 6.0, 6.5, 6.75] and rate == 6.5 and not s.get("capped")
    rate, s = fleet.capacity(plan, make, SLO(), 5.0, steps=3, max_rate=5.0)
    assert rate == 5.0 and s["capped"]


def test_question_figures_come_from_the_unit_simulations(fixed_wafer):
    small = {"chat": 60, "code": 60, "agentic": 30}
    out = q.question(LLAMA70, SPECS["wse3"], ["h100"], ["chat"], 1000.0, q.Assumptions(fast_speed=50.0), small)
    assert out["power_kw"] == 1000.0 and out["requests"] == small
    assert "DGX H100" in out["footprint"]["h100"] and "CS-3" in out["footprint"]["wafer"]
    (row,) = out["rows"]
    for side in ("disaggregated", "integrated"):
        s = row[side]
        assert s["units"] == q.units_in(1000.0, s["unit_kw"]) and s["fleet_kw"] <= 1000.0
        assert s["goodput_req_s"] == pytest.approx(s["units"] * s["sim"]["capacity_req_s"])
        assert s["fast_tokens_s"] == pytest.approx(s["units"] * s["sim"]["fast_tokens_s"])
        assert s["sim"]["simulated"] and s["sim"]["capacity_req_s"] > 0
    d, i = row["disaggregated"], row["integrated"]
    assert d["unit"].endswith("+ 14 x wafer") and len(d["tried"]) >= 2
    assert row["goodput_ratio"] == pytest.approx(d["goodput_req_s"] / i["goodput_req_s"])
    assert row["fast_tokens_ratio"] == pytest.approx(d["fast_tokens_s"] / i["fast_tokens_s"])
    assert out["five_x"] == [{"accelerator": "h100", "mix": "chat", "goodput": row["goodput_ratio"] >= 5,
                              "fast_tokens": row["fast_tokens_ratio"] >= 5}]


def test_sensitivity_swing_and_order(fixed_wafer):
    assert q._swing({"goodput_ratio": 2.0}, [{"goodput_ratio": 4.0}, {"goodput_ratio": 1.0}]) == pytest.approx(math.log(2))
    assert q._swing({"goodput_ratio": 2.0}, [{"goodput_ratio": None}]) == q.UNBOUNDED_SWING
    assert q._swing({"goodput_ratio": None}, [{"goodput_ratio": None}]) == 0.0
    neither = {"goodput_ratio": None, "disaggregated_goodput_req_s": 0.0, "integrated_goodput_req_s": 0.0}
    assert q._swing({"goodput_ratio": 2.0}, [neither, {"goodput_ratio": 3.0}]) == pytest.approx(math.log(1.5))
    # Only power figures moved: no new simulation, the ratio scales with the units that fit.
    table = (("wafer power", "wafer_kw", (11.5,)), ("accelerator power", "accelerator_kw", ("board",)))
    out = q.sensitivity(LLAMA70, SPECS["wse3"], "h100", "chat", 1000.0, q.Assumptions(fast_speed=50.0),
                        {"chat": 60, "code": 60, "agentic": 30}, table=table)
    swings = [r["swing"] for r in out["rows"]]
    assert swings == sorted(swings, reverse=True) and swings[0] > 0
    wafer = next(r for r in out["rows"] if r["field"] == "wafer_kw")["moves"][0]
    assert wafer["goodput_ratio"] > out["base"]["goodput_ratio"]  # half the wafer power: more units fit


@pytest.mark.parametrize("argv, fragments", [
    (("--sweep", "question"), ("needs --power-kw",)),
    (("--sweep", "question", "--power-kw", "500", "--mixes", "chat,poetry"), ("unknown mix 'poetry'",)),
    (("--sweep", "question", "--power-kw", "500", "--tpot-slo", "0.05"), ("drop --tpot-slo",)),
    (("--sweep", "question", "--power-kw", "500", "--accelerator", "trainium2"), ("no system power",)),
    (("--sweep", "sensitivity", "--power-kw", "500", "--mixes", "chat,code"), ("one mix",)),
    (("--mixes", "chat"), ("go with --sweep question",)),
    (("--sweep", "question", "--power-kw", "500", "--trace", "code", "--prefill", "4"), ("drop --trace, --prefill",)),
    (("--accelerator", "h100,b200"), ("comma list",)),
])
def test_question_cli_bad_input(capsys, argv, fragments):
    rc, _, err = run_cli(capsys, "simulate", "--no-progress", *argv)
    assert_one_line_error(rc, err, *fragments)
