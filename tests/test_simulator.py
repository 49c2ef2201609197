"""The fleet simulator (serve/simulator.py) against answers worked out by hand: queueing theory,
one request's timeline, a saturated decode pool; its determinism, its cost models, the trace
reader on the shipped traces, and `wafer simulate` end to end on a measured cost file."""

import dataclasses
import json

import numpy as np
import pytest

from mesh.executors import Grid
from mesh.wafer import emulated_spec
from model.config import TINY_LLAMA, preset
from serve.costs import (H100, DensePrefillCost, IntegratedCost, KVLinkCost, Link, MeasuredCost, RooflineDecodeCost, fit_measured,
                         kv_wire_bytes, prefill_flops, wafer_decode, weight_bytes, weight_params)
from serve.events import Deadlines, FailReason, Mode, SchedulerConfig
from serve.simulator import SLO, Fleet, Router, Simulator, simulate
from serve.streamstats import LogHistogram
from serve.workload import TRACES, LengthDist, Workload, read_azure_trace, synthetic
from tests.helpers.cli_runner import assert_one_line_error, run_cli

LONG = Deadlines(queue_s=1e6, prefill_s=1e6, handoff_s=1e6, token_s=1e6)


def cost(prefill_fixed=0.0, prefill_per_token=0.0, step=0.0, step_per_seq=0.0, handoff=0.0, slots=None):
    return MeasuredCost({"fixed_s": prefill_fixed, "per_token_s": prefill_per_token},
                        {"fixed_s": step, "per_seq_s": step_per_seq}, {"fixed_s": handoff}, slots)


def config(mode=Mode.DISAGGREGATED, slots=4, batch=8, waiting=100_000):
    return SchedulerConfig(mode=mode, slots=slots, max_waiting=waiting, max_prefill_batch=batch,
                           max_prefill_tokens=1 << 20, max_prefilled=2 * slots, deadlines=LONG)


def workload(arrivals, prompts, outputs):
    return Workload(np.asarray(arrivals, np.float64), np.asarray(prompts, np.int64), np.asarray(outputs, np.int64))


def test_single_request_timeline_disaggregated():
    """Arrival 1.0, prompt 100: prefill 0.1 + 100 x 1 ms = 0.2 s; the first token comes with the
    prefill (TTFT = queue 0 + prefill 0.2); the second after the handoff (0.03) and one step (0.05);
    each later one a step apart. TPOT = (handoff + 4 steps) / 4."""
    r = simulate(Fleet(config(), cost(0.1, 1e-3, step=0.05, handoff=0.03)), workload([1.0], [100], [5]),
                 keep_records=True)
    (rec,) = r.records
    assert rec.ttft == pytest.approx(0.2, abs=1e-12)
    assert rec.e2e == pytest.approx(0.2 + 0.03 + 4 * 0.05, abs=1e-12)
    assert rec.tpot == pytest.approx((0.03 + 4 * 0.05) / 4, abs=1e-12)
    assert rec.output_tokens == 5 and rec.failed is None


@pytest.mark.parametrize("on_prefill", [False, True])
def test_handoffs_on_the_prefill_worker_wait_for_its_prefill_in_flight(on_prefill):
    """Prefill 1.0 s, handoff 0.5 s, step 0.1 s, batches of one, one decode slot; A (0.0, 10
    tokens), B (0.2) and C (0.3), 2 tokens each. A prefills 0-1.0, ships 1.0-1.5, steps 1.5-2.4.
    B prefills 1.0-2.0 and waits for the slot; C prefills 2.0-3.0. A ends at 2.4 and B is placed:
    on an independent link B ships 2.4-2.9 and steps 2.9-3.0 (e2e 2.8). On the prefill worker the
    ship command waits for C's prefill in flight: B ships 3.0-3.5, steps 3.5-3.6 (e2e 3.4). A prefill
    never waits for a ship (the live worker ships on a thread of its own): C's TTFT is 2.7 either way."""
    c = dataclasses.replace(cost(1.0, step=0.1, handoff=0.5), handoff_on_prefill=on_prefill)
    r = simulate(Fleet(config(slots=1, batch=1), c), workload([0.0, 0.2, 0.3], [10, 10, 10], [10, 2, 2]),
                 keep_records=True)
    a, b, c_ = sorted(r.records, key=lambda x: int(x.request_id))
    assert (a.ttft, a.e2e) == pytest.approx((1.0, 2.4), abs=1e-12)
    assert (b.ttft, b.e2e) == pytest.approx((1.8, 3.4 if on_prefill else 2.8), abs=1e-12)
    assert c_.ttft == pytest.approx(2.7, abs=1e-12)
    integrated = simulate(Fleet(config(Mode.INTEGRATED, batch=1), c), workload([0.0], [10], [2]), keep_records=True)
    assert integrated.records[0].e2e == pytest.approx(1.1, abs=1e-12)  # no handoff to queue


@pytest.mark.parametrize("listens", [False, True])
def test_a_handoff_into_a_worker_that_listens_between_steps_waits_for_the_step_in_flight(listens):
    """Prefill 1.0 s, handoff 0.02 s, step 0.1 s, prefill batches of one. A (arrival 0, 21 tokens):
    prefill 0-1.0, ships 1.0-1.02 (nothing decoding: the listener opens at once), steps from 1.02,
    0.1 apart, its 20 steps ending at 3.02. B (arrival 1.05, 2 tokens): prefill 1.05-2.05, placed
    at 2.05, during A's step 2.02-2.12. On an independent listener B ships
    2.05-2.07 and joins at the next boundary, 2.12: its step 2.12-2.22, e2e 1.17. Listening between
    steps, B's transfer starts when that step ends, 2.12-2.14, so B joins at 2.22 and its step
    ends at 2.32: e2e 1.27, one step later. A's timeline is the same either way."""
    c = dataclasses.replace(cost(1.0, step=0.1, handoff=0.02), listens_between_steps=listens)
    for bulk in (True, False):
        r = Simulator(Fleet(config(batch=1), c), workload([0.0, 1.05], [10, 10], [21, 2]), keep_records=True,
                      bulk_steps=bulk).run()
        a, b = sorted(r.records, key=lambda x: int(x.request_id))
        assert (a.ttft, a.e2e) == pytest.approx((1.0, 3.02), abs=1e-9)
        assert (b.ttft, b.e2e) == pytest.approx((1.0, 1.27 if listens else 1.17), abs=1e-9)
    # Integrated has no handoff; a lone request's handoff finds no step in flight.
    lone = simulate(Fleet(config(batch=1), c), workload([0.0], [10], [3]), keep_records=True).records[0]
    assert lone.e2e == pytest.approx(1.0 + 0.02 + 2 * 0.1, abs=1e-12)


def test_a_transfer_queued_when_its_listener_opens_follows_the_prefill_sent_before_it():
    """The live server's path: the decode worker opens the listener, then the engine asks the
    prefill worker to ship, behind the prefill batch it sent with the placement. Prefill 1.0 s,
    handoff 0.5 s, step 0.1 s, batches of one; A at 0, B at 0.2, 2 tokens each. At 1.0 A's prefill
    ends, A is placed and B's prefill starts (1.0-2.0); A's listener opens at once (nothing
    decodes) but its transfer waits for B's prefill: 2.0-2.5. B is placed at 2.0 and its listener
    opens at once too (nothing decodes yet); it ships after A, 2.5-3.0. A's step, decided when A's
    cache lands at 2.5, waits for B's, which is landing then (the decode worker lands caches in its
    loop, between commands): A and B step together, 3.0-3.1 (A's e2e 3.1, B's TTFT 1.8, e2e 2.9)."""
    c = dataclasses.replace(cost(1.0, step=0.1, handoff=0.5), handoff_on_prefill=True, listens_between_steps=True)
    for bulk in (True, False):
        r = Simulator(Fleet(config(batch=1), c), workload([0.0, 0.2], [10, 10], [2, 2]), keep_records=True,
                      bulk_steps=bulk).run()
        a, b = sorted(r.records, key=lambda x: int(x.request_id))
        assert (a.ttft, a.e2e) == pytest.approx((1.0, 3.1), abs=1e-12)
        assert (b.ttft, b.e2e) == pytest.approx((1.8, 2.9), abs=1e-12)
        assert r.link_busy_s == pytest.approx(1.0, abs=1e-12)
        assert (r.decode_steps, r.decode_batch_sum) == (1, 2)  # one step over both


def test_workers_that_share_a_machine_slow_each_other_down():
    """Prefill 1.0 s, step 0.1 s, no handoff time; a prefill runs 2x slower while the decode batch
    steps, a step 3x slower while a prefill runs. A (0.0, 11 tokens) prefills alone: TTFT 1.0,
    steps from 1.0, 0.1 apart. B arrives at 1.55, in A's sixth step (1.5-1.6). A's steps left are
    0.45 s of work: 0.05 of the sixth, done by 1.7, and four more, 0.3 each beside B's prefill: A
    ends at 2.9 (2.0 without contention). B's prefill does 1.35 / 2 of its 1.0 s of work beside
    them, the rest alone: 1.55-3.225 (TTFT 1.675). B's one step then runs alone: 3.225-3.325."""
    c = dataclasses.replace(cost(1.0, step=0.1), contention={"prefill": 2.0, "decode": 3.0})
    w = workload([0.0, 1.55], [10, 10], [11, 2])
    for bulk in (True, False):
        r = Simulator(Fleet(config(batch=1), c), w, keep_records=True, bulk_steps=bulk).run()
        a, b = sorted(r.records, key=lambda x: int(x.request_id))
        assert (a.ttft, a.e2e) == pytest.approx((1.0, 2.9), abs=1e-9)
        assert (b.ttft, b.e2e) == pytest.approx((1.675, 1.775), abs=1e-9)
        # 11 steps priced at 0.1 s; as they ran, A's ten took 1.0-2.9 and B's one 0.1 (what the
        # server's histogram of step times would record).
        assert (r.decode_steps, r.decode_steps_ended) == (11, 11)
        assert (r.decode_busy_s, r.decode_wall_s) == pytest.approx((1.1, 2.0), abs=1e-9)
    alone = simulate(Fleet(config(batch=1), cost(1.0, step=0.1)), w, keep_records=True)
    assert sorted(r.e2e for r in alone.records) == pytest.approx([1.1, 2.0], abs=1e-9)
    assert alone.decode_wall_s == pytest.approx(alone.decode_busy_s, abs=1e-12) and alone.decode_steps_ended == 11
    # One worker on all the CPUs (integrated) has no neighbour to contend with.
    integrated = simulate(Fleet(config(Mode.INTEGRATED, batch=1), c), workload([0.0], [10], [2]), keep_records=True)
    assert integrated.records[0].e2e == pytest.approx(1.1, abs=1e-12)
    with pytest.raises(ValueError, match="contention"):
        dataclasses.replace(c, contention={"prefill": 0.0})


def test_a_simulation_gives_back_the_collector_settings():
    import gc
    before = gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()
    simulate(Fleet(config(), cost(0.1, step=0.05, handoff=0.03)), workload([0.0, 0.5], [10, 10], [3, 3]))
    assert (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()) == before


def test_queue_adds_to_ttft_and_tpot_is_the_step_integrated():
    """Two prompts at t=0, prefill batches of one: the second waits out the first's prefill (0.2 s)
    and then the one decode step in flight (integrated: one unit of work at a time). Integrated has
    no handoff, so a lone request's TPOT is exactly the step time."""
    c = cost(0.1, 1e-3, step=0.05)
    r = simulate(Fleet(config(Mode.INTEGRATED, batch=1), c), workload([0.0, 0.0], [100, 100], [3, 3]),
                 keep_records=True)
    first, second = sorted(r.records, key=lambda x: int(x.request_id))
    assert first.ttft == pytest.approx(0.2, abs=1e-12)
    # 0.2: the first's prefill ends and the second's prefill starts at once (a free slot wins).
    assert second.ttft == pytest.approx(0.4, abs=1e-12)
    solo = simulate(Fleet(config(Mode.INTEGRATED), c), workload([0.0], [100], [6]), keep_records=True).records[0]
    assert solo.tpot == pytest.approx(0.05, abs=1e-12)


def test_md1_mean_wait_is_pollaczek_khinchine():
    """Poisson arrivals (rate 0.5/s) at a deterministic server (prefill 1 s, one prompt at a time):
    rho = 0.5, mean wait W = rho D / (2 (1 - rho)) = 0.5 s, so mean TTFT = W + D = 1.5 s. One-token
    requests end at their prefill, so the prefill worker is the whole system. 10,000 requests give
    a standard error of the mean of about 1.3% (waits are correlated); 4% is the tolerance."""
    w = synthetic(10_000, rate=0.5, input_len=10, output_len=1, seed=3)
    r = simulate(Fleet(config(batch=1), cost(prefill_fixed=1.0)), w)
    assert r.finished == 10_000
    assert r.ttft.mean == pytest.approx(1.5, rel=0.04)


def test_saturated_decode_pool_throughput():
    """All requests at once, 4 slots, a 0.1 s step, 11 tokens each (1 from prefill + 10 steps).
    A slot freed at a step's end is refilled by a handoff that lands while the next step is
    already running, so each slot serves one request per 11 steps: 4 / 1.1 s = 3.636 req/s; two
    units double it."""
    n = 400
    w = workload(np.zeros(n), np.full(n, 16), np.full(n, 11))
    c = cost(prefill_fixed=1e-4, step=0.1)
    one = simulate(Fleet(config(slots=4), c), w).summary()
    assert one["throughput_req_s"] == pytest.approx(4 / 1.1, rel=0.01)
    assert one["utilisation"]["decode"] == pytest.approx(1.0, rel=0.01)
    two = simulate(Fleet(config(slots=4), c, units=2), w).summary()
    assert two["throughput_req_s"] == pytest.approx(2 * 4 / 1.1, rel=0.01)


def test_goodput_and_fast_tokens_follow_the_slos():
    r = simulate(Fleet(config(), cost(0.1, step=0.05)), workload([0.0], [10], [5]),
                 SLO(ttft_s=0.05, tpot_s=1.0, fast_tokens_per_s=10.0))
    assert r.good == 0  # TTFT 0.1 > 0.05
    assert r.fast_tokens == 5  # TPOT 0.05 s: 20 tok/s >= 10
    r = simulate(Fleet(config(), cost(0.1, step=0.05)), workload([0.0], [10], [5]),
                 SLO(ttft_s=0.2, tpot_s=1.0, fast_tokens_per_s=30.0))
    assert r.good == 1 and r.fast_tokens == 0


def test_deterministic_for_a_seed():
    def run(seed):
        w = synthetic(500, rate=40.0, input_len=64, output_len=16, seed=seed, burstiness=0.5)
        c = cost(0.01, 1e-5, step=0.01, step_per_seq=1e-4, handoff=1e-3)
        return simulate(Fleet(config(slots=8), c, units=3, router=Router.LEAST_LOADED), w).summary()
    a, b, other = run(7), run(7), run(8)
    assert a == b
    assert a != other


def test_round_robin_spreads_arrivals_evenly():
    w = workload(np.arange(9) * 10.0, np.full(9, 8), np.full(9, 2))
    r = simulate(Fleet(config(), cost(0.01, step=0.01), units=3, router=Router.ROUND_ROBIN), w, keep_records=True)
    assert sorted(rec.unit for rec in r.records) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_overload_rejects_at_the_queue_bound():
    w = workload(np.zeros(20), np.full(20, 8), np.full(20, 2))
    r = simulate(Fleet(config(batch=1, waiting=5), cost(1.0, step=0.01)), w)
    # The first arrival starts its prefill at once (leaving the queue), the next 5 wait, 14 are refused.
    assert r.failed == {FailReason.QUEUE_FULL.value: 14}
    assert r.finished == 6


def test_deadline_fails_requests_through_ticks():
    """A queue deadline of 0.5 s with a 1 s prefill: the second prompt waits past its deadline and
    is failed by a Tick even though no other event comes."""
    cfg = SchedulerConfig(slots=4, max_prefill_batch=1, deadlines=Deadlines(queue_s=0.5, prefill_s=5.0))
    r = simulate(Fleet(cfg, cost(1.0, step=0.01)), workload([0.0, 0.0], [8, 8], [2, 2]), keep_records=True)
    assert r.failed == {FailReason.DEADLINE.value: 1}
    (failed,) = [rec for rec in r.records if rec.failed]
    assert failed.e2e == pytest.approx(0.5)


def test_log_histogram_quantiles_within_half_a_bucket():
    rng = np.random.default_rng(0)
    x = rng.lognormal(-3, 1.5, 200_000)
    h = LogHistogram()
    for v in x.tolist():
        h.add(v)
    half_bucket = 10 ** (1 / 400) - 1
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(x, q), rel=half_bucket + 1e-3)
    assert h.mean == pytest.approx(x.mean(), rel=1e-12)
    assert (h.min, h.max, h.count) == (x.min(), x.max(), x.size)


def test_prefill_and_decode_cost_models_by_hand():
    c = TINY_LLAMA  # D 64, F 160, L 2, N 4, K 2, H 16, V 512
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160  # q, k+v, o, gate+up+down
    assert weight_params(c) == 2 * per_layer + 64 * 512
    # One prompt of 3 tokens: 2 x layer params x 3, the LM head once, attention over 6 pairs.
    assert prefill_flops(c, [3]) == 2 * 2 * per_layer * 3 + 2 * 64 * 512 + 4 * 2 * 4 * 16 * 6
    p = DensePrefillCost(preset("llama3.1-70b"), H100, count=8, mfu=0.5, overhead_s=0.0)
    flops = prefill_flops(p.config, [2048])
    assert p.prefill_s([2048]) == pytest.approx(flops / (8 * 989e12 * 0.5))
    d = RooflineDecodeCost(preset("llama3.1-70b"), H100, count=4, bw_efficiency=1.0, overhead_s=0.0)
    kv = 2 * 80 * 8 * 128 * 2  # bytes per token: K and V, 80 layers, 8 KV heads of 128, 16-bit
    assert d.decode_step_s(1, 1000) == pytest.approx((weight_bytes(d.config) + 1000 * kv) / (4 * 3.35e12))
    # Integrated: a whole prefill pays its overhead and the weight read if larger; chunked, only its FLOPs.
    p2 = DensePrefillCost(preset("llama3.1-70b"), H100, count=4, mfu=0.5, overhead_s=2e-3)
    whole, chunked = IntegratedCost(p2, d), IntegratedCost(p2, d, chunked=True)
    assert whole.prefill_s([8]) == pytest.approx(2e-3 + weight_bytes(p2.config) / (4 * 3.35e12))
    assert chunked.prefill_s([8]) == pytest.approx(prefill_flops(p2.config, [8]) / (4 * 989e12 * 0.5))
    assert whole.handoff_s(1000) == 0.0


def test_kv_link_bytes_and_time_by_hand():
    c = TINY_LLAMA
    payload = 2 * 2 * 16 * 100 * 2  # K and V, 2 KV heads of 16, 100 tokens, 16-bit; per layer
    assert kv_wire_bytes(c, 100) == 64 * 1024 + 2 * (16 + payload + 8)
    link = KVLinkCost(c, Link("test", 1e9, 1e-5))
    assert link.handoff_s(100) == pytest.approx(1e-5 + kv_wire_bytes(c, 100) / 1e9)


def test_wafer_decode_cost_from_the_profiler():
    spec = emulated_spec(1 << 20)
    d = wafer_decode(TINY_LLAMA, spec, "2x4", context=64, slots=4)
    assert d.slots == 4 and d.wafers >= 1
    assert d.decode_step_s(1, 0) == d.step_1_s
    assert d.decode_step_s(4, 0) == pytest.approx(d.step_slots_s)
    assert d.step_slots_s >= d.step_1_s > 0
    assert d.decode_step_s(2, 0) == pytest.approx(d.step_1_s + (d.step_slots_s - d.step_1_s) / 3)
    assert Grid.parse(d.grid) == Grid(2, 4)


def test_fit_measured_recovers_its_coefficients():
    prefill = [([t], 0.01 + 2e-5 * t + 1e-9 * t * t) for t in (16, 64, 256, 1024)]
    prefill += [([t, t], 0.01 + 2e-5 * 2 * t + 1e-9 * 2 * t * t) for t in (32, 512)]
    decode = [(b, c, 0.005 + 1e-4 * b + 1e-7 * c) for b, c in ((1, 100), (4, 800), (8, 100), (16, 5000))]
    handoff = [(t, 1e-3 + 1e-6 * t) for t in (10, 100, 1000)]
    m = fit_measured(prefill, decode, handoff, slots=8)
    assert m.prefill_s([300, 40]) == pytest.approx(0.01 + 2e-5 * 340 + 1e-9 * (300 ** 2 + 40 ** 2))
    assert m.decode_step_s(3, 999) == pytest.approx(0.005 + 3e-4 + 999e-7)
    assert m.handoff_s(77) == pytest.approx(1e-3 + 77e-6)


@pytest.mark.parametrize("name, rows, prompt_mean, output_mean", [("code", 8819, 2048, 28), ("conv", 19366, 1155, 211)])
def test_azure_traces_ship_and_read(name, rows, prompt_mean, output_mean):
    assert (TRACES[name].parent / "README.md").read_text().count("CC BY 4.0") >= 1
    w = read_azure_trace(name)
    assert len(w) == rows
    assert w.arrival_s[0] == 0.0 and np.all(np.diff(w.arrival_s) >= 0)
    assert w.span_s == pytest.approx(3436 if name == "code" else 3502, abs=1)
    assert w.prompt_len.mean() == pytest.approx(prompt_mean, abs=1)
    assert w.output_len.mean() == pytest.approx(output_mean, abs=1)
    replay = read_azure_trace(name, requests=2 * rows + 5, time_scale=0.5)
    assert len(replay) == 2 * rows + 5 and np.all(np.diff(replay.arrival_s) >= 0)
    assert replay.prompt_len[rows] == w.prompt_len[0]


def test_wafer_simulate_on_a_measured_file(capsys, tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(cost(0.01, 1e-5, step=0.01, step_per_seq=1e-4, handoff=1e-3, slots=8).to_json()))
    rc, out, _ = run_cli(capsys, "simulate", "--measured", str(path), "--units", "2", "--requests", "500",
                         "--rate", "20", "--profile", "chat", "--json", "--no-progress")
    assert rc == 0
    s = json.loads(out)
    assert s["finished"] == 500 and s["ttft_s"]["p50"] > 0 and s["tpot_s"]["p90"] > 0
    assert 0 < s["utilisation"]["decode"] <= 1


def test_wafer_simulate_needs_both_pools(capsys):
    rc, _, err = run_cli(capsys, "simulate", "--requests", "10", "--prefill", "4")
    assert_one_line_error(rc, err, "--prefill N --decode M")


def test_wafer_simulate_disaggregated_from_presets(capsys):
    rc, out, _ = run_cli(capsys, "simulate", "--model", "tiny-llama", "--grid", "4x4", "--context", "128",
                         "--prefill", "2", "--decode", "2", "--requests", "200", "--rate", "100", "--input-len", "64",
                         "--output-len", "8", "--json", "--no-progress", "--prefill-cost-h", "2", "--decode-cost-h", "50")
    assert rc == 0
    s = json.loads(out)
    assert s["finished"] == 200 and s["fleet"]["prefill_chips_per_unit"] == 1.0
    assert s["power_kw"] == pytest.approx(2 * 0.7 + 2 * 23.0)
    assert s["cost_per_h"] == pytest.approx(2 * 2 + 2 * 50)


def test_capacity_of_a_deterministic_server():
    """Near-deterministic arrivals (gamma shape 1e6) at a 1 s prefill server, one-token requests,
    TTFT SLO 1.5 s: below 1 req/s nothing queues and all pass; above it the wait grows by
    (1 - 1/rate) s per request, so 90% of 200 pass only up to rate 1/(1 - 0.5/180) = 1.003. The
    search brackets [0.6, 1.2] from 0.3 and bisects to 1%."""
    from bench.fleet import capacity, measured

    plan = measured(cost(prefill_fixed=1.0, slots=4), Mode.DISAGGREGATED)
    plan = dataclasses.replace(plan, fleet=dataclasses.replace(plan.fleet, config=config(batch=1)))
    rate, s = capacity(plan, lambda r: synthetic(200, r, 8, 1, seed=0, burstiness=1e6), SLO(ttft_s=1.5), 0.3)
    assert rate == pytest.approx(1.0, abs=0.012)
    assert s["slo_attainment"] >= 0.9


@pytest.mark.parametrize("mode", [Mode.DISAGGREGATED, Mode.INTEGRATED])
def test_a_hung_decode_worker_is_restarted_and_serving_goes_on(mode):
    """Decode steps of 1 s against a 0.5 s token deadline: the scheduler declares the worker hung,
    the simulator restarts it (2 s), and the requests it held fail; one-token requests that never
    need a decode step still finish, before and after the restart."""
    cfg = SchedulerConfig(mode=mode, slots=2, max_prefill_batch=1,
                          deadlines=Deadlines(queue_s=100.0, prefill_s=100.0, handoff_s=100.0, token_s=0.5))
    w = workload([0.0, 0.1, 5.0], [8, 8, 8], [3, 1, 1])
    r = simulate(Fleet(cfg, cost(0.01, step=1.0), restart_s=2.0), w, keep_records=True)
    by_id = {rec.request_id: rec for rec in r.records}
    assert by_id["0"].failed is FailReason.DEADLINE
    assert by_id["1"].failed is None and by_id["2"].failed is None
    assert by_id["2"].ttft == pytest.approx(0.01)


def test_decode_steps_are_priced_at_the_context_they_read():
    """Prompt 100, 3 tokens, a step costing 1 ms per context position: the first decode step
    reads 101 positions (the prompt and the token it writes), the second 102."""
    c = MeasuredCost({"fixed_s": 0.01}, {"per_context_token_s": 1e-3}, {}, None)
    sim = Simulator(Fleet(config(), c), workload([0.0], [100], [3]), keep_records=True)
    (rec,) = sim.run().records
    assert rec.e2e - rec.ttft == pytest.approx(0.101 + 0.102, abs=1e-12)
    assert sim.units[0].context == 0


def test_context_accounting_returns_to_zero():
    w = synthetic(300, rate=50.0, input_len=64, output_len=12, seed=2, length_dist=LengthDist.UNIFORM)
    for mode in Mode:
        sim = Simulator(Fleet(config(mode, slots=8), cost(0.01, 1e-5, step=0.01, handoff=2e-3), units=2), w)
        assert sim.run().finished == 300
        assert [u.context for u in sim.units] == [0, 0]


def test_parallel_simulation_equals_the_serial_one():
    """Round-robin units never interact, so two processes give the serial result."""
    from serve.simulator import simulate_parallel

    w = synthetic(1200, rate=60.0, input_len=64, output_len=12, seed=4, length_dist=LengthDist.EXPONENTIAL)
    fleet = Fleet(config(slots=8), cost(0.01, 1e-5, step=0.01, step_per_seq=1e-4, handoff=1e-3), units=3,
                  router=Router.ROUND_ROBIN)
    serial = simulate(fleet, w, keep_records=True)
    parallel = simulate_parallel(fleet, w, processes=2, keep_records=True)
    key = lambda r: int(r.request_id)
    assert sorted(parallel.records, key=key) == sorted(serial.records, key=key)
    a, b = serial.summary(), parallel.summary()
    assert a.pop("ttft_s")["mean"] == pytest.approx(b.pop("ttft_s")["mean"])
    assert a.pop("failed") == b.pop("failed")
    for d in (a, b):
        for k in ("tpot_s", "e2e_s", "utilisation"):
            d.pop(k)
    assert a == pytest.approx(b)
    with pytest.raises(ValueError, match="round-robin"):
        simulate_parallel(dataclasses.replace(fleet, router=Router.LEAST_LOADED), w)


def test_prefill_pool_must_hold_the_weights(capsys):
    rc, _, err = run_cli(capsys, "simulate", "--prefill", "1", "--decode", "14", "--requests", "10")
    assert_one_line_error(rc, err, "do not fit 1 h100")


def test_requests_beyond_the_context_are_refused_before_the_scheduler():
    w = workload([0.0, 1.0, 2.0], [100, 4000, 90], [10, 200, 11])
    r = simulate(Fleet(config(), cost(0.01, step=0.01), max_context=4096), w, keep_records=True)
    assert r.failed == {"too_long": 1} and r.finished == 2
    assert [rec.request_id for rec in r.records if rec.unit == -1] == ["1"]


def _assert_bulk_equals_step_by_step(fleet, w):
    """Decode steps in bulk (the default) against one event per decode step: the same report and
    the same per-request records. Returns both results."""
    bulk = Simulator(fleet, w, keep_records=True).run()
    step = Simulator(fleet, w, keep_records=True, bulk_steps=False).run()
    key = lambda r: int(r.request_id)
    assert sorted(bulk.records, key=key) == sorted(step.records, key=key)
    a, b = bulk.summary(), step.summary()
    a.pop("events"), b.pop("events")
    # Decode busy time is the same steps' times summed in another order.
    assert a.pop("utilisation") == pytest.approx(b.pop("utilisation"), rel=1e-9)
    assert a == b
    return bulk, step


@pytest.mark.parametrize("mode", [Mode.DISAGGREGATED, Mode.INTEGRATED])
@pytest.mark.parametrize("deadlines", [LONG, Deadlines(queue_s=0.5, prefill_s=5.0, handoff_s=0.3, token_s=0.0051)],
                         ids=["no-deadlines", "tight"])
def test_decode_steps_in_bulk_equal_one_event_per_step(mode, deadlines):
    """A loaded fleet of two least-loaded units, exponential lengths, steps priced by batch and
    context. The tight token deadline sits inside the range of step times, so bigger batches hang
    the decode worker (restarts) and queues and handoffs overrun theirs."""
    cfg = SchedulerConfig(mode=mode, slots=8, max_waiting=64, max_prefill_batch=4, max_prefilled=16,
                          deadlines=deadlines)
    c = MeasuredCost({"fixed_s": 0.005, "per_token_s": 2e-6},
                     {"fixed_s": 0.005, "per_seq_s": 1e-5, "per_context_token_s": 1e-8}, {"fixed_s": 0.001}, 8)
    w = synthetic(500, rate=120.0, input_len=300, output_len=30, seed=1, length_dist=LengthDist.EXPONENTIAL)
    bulk, step = _assert_bulk_equals_step_by_step(Fleet(cfg, c, units=2, restart_s=0.5), w)
    assert bulk.finished > 50 and (deadlines is LONG or bulk.failed.get("deadline", 0) > 0)
    if deadlines is LONG:  # (when steps hang, plans are a step long and catching up costs events)
        assert bulk.events < step.events


@pytest.mark.parametrize("mode", [Mode.DISAGGREGATED, Mode.INTEGRATED])
@pytest.mark.parametrize("token_s", [0.25, 0.5])
def test_decode_steps_in_bulk_equal_one_event_per_step_at_tied_times(mode, token_s):
    """Round step, prefill and handoff times and arrivals on a quarter-second grid: events tie
    with step ends (and, at token_s = 0.25, a step's end ties with its own deadline)."""
    cfg = SchedulerConfig(mode=mode, slots=4, max_waiting=32, max_prefill_batch=3, max_prefilled=6,
                          deadlines=Deadlines(queue_s=2.0, prefill_s=5.0, handoff_s=1.0, token_s=token_s))
    w = synthetic(300, rate=3.0, input_len=200, output_len=12, seed=2, length_dist=LengthDist.UNIFORM)
    w = Workload(np.round(w.arrival_s * 4) / 4, w.prompt_len, w.output_len)
    _assert_bulk_equals_step_by_step(Fleet(cfg, cost(0.5, step=0.25, handoff=0.25, slots=4), units=2,
                                           restart_s=0.75), w)


def test_decode_steps_in_bulk_equal_one_event_per_step_with_contention():
    """Prefills that slow the steps in flight (and steps that slow the prefills) re-time plans
    mid-way: the bulk plans must still give what one event per step gives."""
    cfg = SchedulerConfig(mode=Mode.DISAGGREGATED, slots=8, max_waiting=64, max_prefill_batch=2, max_prefilled=16,
                          deadlines=LONG)
    c = MeasuredCost({"fixed_s": 0.05, "per_token_s": 2e-4},
                     {"fixed_s": 0.02, "per_seq_s": 1e-4, "per_context_token_s": 1e-7}, {"fixed_s": 0.01}, 8,
                     handoff_on_prefill=True, contention={"prefill": 2.5, "decode": 1.7})
    w = synthetic(300, rate=4.0, input_len=200, output_len=40, seed=3, length_dist=LengthDist.EXPONENTIAL)
    bulk, _ = _assert_bulk_equals_step_by_step(Fleet(cfg, c), w)
    plain = simulate(Fleet(cfg, dataclasses.replace(c, contention={})), w)
    assert bulk.finished == plain.finished == 300
    assert bulk.summary()["ttft_s"]["p50"] > plain.summary()["ttft_s"]["p50"]
    assert bulk.summary()["tpot_s"]["p50"] > plain.summary()["tpot_s"]["p50"]
