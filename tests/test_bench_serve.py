"""`wafer bench serve` against a fake OpenAI-compatible server whose timings are known: the requests
it sends, the metrics it computes from them (vLLM's definitions), its arrival processes, the rate
search, failures, the JSON and the errors a user can cause."""

import asyncio
import contextlib
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from bench.serve_client import LoadRun, RequestRecord
from bench.serve_load import RateSearch, environment, find_max_rate
from bench.serve_metrics import SLOs, parse_slos, summarize
from bench.serve_report import format_table
from bench.serve_workload import PROMPT_ID_MARGIN, Workload, arrival_times, make_requests
from mesh.errors import WaferError
from tests.helpers.cli_runner import assert_one_line_error, run_cli

MODEL = "fake-model"


class FakeServer:
    """A streaming /v1/completions on 127.0.0.1 that never looks at its prompt.

    Each request takes one of `slots` (waiting for a free one, as a server's queue does), sends its
    first chunk `ttft` seconds after getting the slot and one more every `gap` seconds, each at a
    deadline from the start so delays do not add up; `tokens_per_chunk` tokens go in each chunk.
    Of the requests in arrival order, every `fail_every`-th is refused with 429 and every
    `break_every`-th breaks after its first chunk: the connection drops (`breaks="cut"`), an error
    event comes (`"error"`) or nothing more comes (`"stall"`).
    """

    def __init__(self, ttft=0.0, gap=0.0, slots=1000, tokens_per_chunk=1, fail_every=0, break_every=0,
                 breaks="cut", worker_metrics=False):
        self.ttft, self.gap, self.slots, self.tokens_per_chunk = ttft, gap, slots, tokens_per_chunk
        # worker_metrics: a /metrics with wafer serve's worker histograms, one 50 ms prefill batch
        # per request and one 20 ms decode step per chunk after the first (None: no /metrics, 404).
        self.registry = None
        if worker_metrics:
            from prometheus_client import CollectorRegistry, Histogram
            self.registry = CollectorRegistry()
            self.prefill_h = Histogram("wafer_prefill_batch_seconds", "", registry=self.registry)
            self.step_h = Histogram("wafer_decode_step_seconds", "", registry=self.registry)
        self.fail_every, self.break_every, self.breaks = fail_every, break_every, breaks
        self.bodies: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.url = ""

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(self, request):
        body = await request.json()
        self.bodies.append(body)
        n = len(self.bodies)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.answer(request, body, n)
        finally:
            self.in_flight -= 1

    async def metrics(self, request):
        if self.registry is None:
            raise web.HTTPNotFound()
        from prometheus_client import generate_latest
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def answer(self, request, body, n):
        if self.fail_every and n % self.fail_every == 0:
            return web.json_response({"error": {"message": "queue full", "type": "rate_limit"}}, status=429)
        if self.registry is not None:
            self.prefill_h.observe(0.05)
            for _ in range(body["max_tokens"] - 1):
                self.step_h.observe(0.02)
        async with self.semaphore:
            start = time.perf_counter()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            max_tokens, sent, chunk = body["max_tokens"], 0, 0
            while sent < max_tokens:
                await asyncio.sleep(max(0.0, start + self.ttft + chunk * self.gap - time.perf_counter()))
                k = min(self.tokens_per_chunk, max_tokens - sent)
                event = {"object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": "x" * k, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                sent, chunk = sent + k, chunk + 1
                if self.break_every and n % self.break_every == 0:
                    if self.breaks == "error":
                        await resp.write(b'data: {"error": {"message": "decode worker died", "code": 500}}\n\n')
                    elif self.breaks == "stall":
                        await asyncio.sleep(60)  # cancelled when the client gives up (handler_cancellation)
                    request.transport.close()
                    return resp
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent,
                     "total_tokens": len(body["prompt"]) + sent}
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    async def start(self):
        self.semaphore = asyncio.Semaphore(self.slots)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self):
        await self.runner.cleanup()


@contextlib.contextmanager
def serving(**kw):
    """A FakeServer on its own event loop in a thread (the client runs asyncio.run in this one)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeServer(**kw)
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def bench_json(capsys, url, *args):
    rc, out, err = run_cli(capsys, "bench", "serve", "--url", url, "--json", *args)
    assert rc in (0, 1), err  # 2 would be a usage error with no JSON
    return rc, json.loads(out), err


# ------------------------------------------------------------------------------- what is sent


def test_prompts_are_token_exact_and_streamed(capsys):
    with serving() as fake:
        # The base URL as OpenAI clients write it (ending in /v1) names the same server.
        rc, r, _ = bench_json(capsys, fake.url + "/v1/", "--input-len", "37", "--output-len", "5", "--requests", "6",
                              "--vocab-size", "1000")
    assert rc == 0
    assert len(fake.bodies) == 1 + 6 and r["warmup"] == 1  # one unmeasured warm-up request first
    for body in fake.bodies:
        assert body["model"] == MODEL  # the first id of /v1/models
        assert len(body["prompt"]) == 37
        assert all(isinstance(t, int) and PROMPT_ID_MARGIN <= t < 1000 - PROMPT_ID_MARGIN for t in body["prompt"])
        assert body["max_tokens"] == 5
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    assert len({tuple(b["prompt"]) for b in fake.bodies}) == 7  # different prompts, warm-up included
    run = r["runs"][0]
    assert run["completed"] == 6 and run["failed"] == 0
    assert run["input_tokens"] == 6 * 37 and run["output_tokens"] == 6 * 5
    assert run["prompt_len_mismatches"] == 0 and run["short_outputs"] == 0


def test_profiles_and_spread_give_the_asked_lengths():
    exact = make_requests(Workload(2048, 32, 50, seed=3))
    assert {len(s.prompt_ids) for s in exact} == {2048} and {s.output_len for s in exact} == {32}
    spread = make_requests(Workload(100, 40, 200, seed=3, spread=0.5))
    ins = [len(s.prompt_ids) for s in spread]
    outs = [s.output_len for s in spread]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert min(outs) >= 20 and max(outs) <= 60
    assert make_requests(Workload(100, 40, 200, seed=3, spread=0.5)) == spread  # seeded
    assert make_requests(Workload(100, 40, 200, seed=4, spread=0.5)) != spread
    with pytest.raises(WaferError, match="spread"):
        Workload(10, 10, 1, 0, spread=1.0)


# ------------------------------------------------------------------------------------- metrics


def _rec(i, scheduled, chunks, tokens=None, error=None, asked=4, prompt=10):
    return RequestRecord(i, prompt, asked, scheduled, sent=scheduled, chunk_times=list(chunks),
                         finish=chunks[-1] if chunks else None,
                         output_tokens=tokens if tokens is not None else (len(chunks) or None),
                         prompt_tokens=prompt, status=503 if error else 200, error=error)


def test_metrics_from_known_timings_equal_hand_computed_values():
    records = [
        _rec(0, 0.0, [0.10, 0.15, 0.25, 0.30]),  # TTFT 100, E2E 300, TPOT 200/3, ITL 50 100 50
        _rec(1, 0.5, [0.70, 0.80], tokens=5, asked=5),  # chunks of several tokens: TPOT 100/4 = 25, ITL 100
        _rec(2, 0.6, [], error="HTTP 503: busy"),
        _rec(3, 1.0, [1.05], tokens=1, asked=1),  # one token: TTFT 50, E2E 50, no TPOT (0 for goodput)
    ]
    s = summarize(LoadRun(records, duration=2.0), rate=2.0, burstiness=1.0,
                  slos=parse_slos(["ttft:150", "tpot:50"]))
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"HTTP 503: busy": 1}
    assert s["output_tokens"] == 10 and s["input_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(5.0)
    # TTFT 100, 200, 50: numpy's linear p90 of [50, 100, 200] is 100 + 0.8 * 100.
    assert s["ttft_ms"] == pytest.approx({"mean": 350 / 3, "median": 100, "p90": 180, "p99": 198}, abs=1e-3)
    # TPOT 66.667 and 25 (the one-token request has none).
    assert s["tpot_ms"] == pytest.approx({"mean": 275 / 6, "median": 275 / 6, "p90": 25 + 0.9 * 125 / 3,
                                          "p99": 25 + 0.99 * 125 / 3}, abs=1e-3)
    # ITL: one gap per chunk, 50 100 50 and 100.
    assert s["itl_ms"] == pytest.approx({"mean": 75, "median": 75, "p90": 100, "p99": 100}, abs=1e-3)
    assert s["e2e_ms"] == pytest.approx({"mean": 650 / 3, "median": 300, "p90": 300, "p99": 300}, abs=1e-3)
    # Good: only request 3 (0 has TPOT 66.7 > 50, 1 has TTFT 200 > 150, 2 failed).
    assert s["good_requests"] == 1
    assert s["goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.25)
    no_slo = summarize(LoadRun(records, 2.0), 2.0, 1.0, SLOs())
    assert no_slo["goodput"] is None and no_slo["slo_attainment"] is None
    # Arrivals span 1.0 s, over the median request's 0.3 s: the run held its rate.
    assert (s["arrival_window_s"], s["sustained"]) == (1.0, True)


def test_a_run_shorter_than_its_requests_is_flagged_a_burst():
    # Three requests sent within 0.2 s that each take ~1 s: the server drained a burst; nothing
    # says it could hold that rate, so the report must not read as if it did.
    records = [_rec(i, 0.1 * i, [0.1 * i + 0.3, 0.1 * i + 1.0]) for i in range(3)]
    s = summarize(LoadRun(records, 1.2), 15.0, 1.0, parse_slos(["ttft:500"]))
    assert (s["arrival_window_s"], s["sustained"]) == (0.2, False)
    assert s["slo_attainment"] == 1.0
    report = {"label": None, "url": "http://x", "model": "m", "requests": 3, "seed": 0, "burstiness": 1.0,
              "max_concurrency": None, "warmup": 0, "slos": {"ttft_ms": 500.0}, "cpus": 2,
              "profile": {"name": "custom", "input_len": 4, "output_len": 2, "spread": 0, "vocab_size": 100},
              "runs": [s], "env": environment(None)}
    assert "a burst, not a sustained rate" in format_table(report)
    assert "warning @ 15" in format_table({**report, "runs": [s, {**s, "rate": 1.0, "sustained": True}]})
    assert summarize(LoadRun([], 1.0), 1.0, 1.0, SLOs())["sustained"] is None
    # A search whose top end held says the knee lies above it, and names the burst probes.
    search = {"target_attainment": 0.9, "lo": 1.0, "hi": 15.0, "steps": 0, "max_rate": 15.0, "max_rate_per_cpu": 7.5,
              "probes": [{"rate": 1.0, "attainment": 1.0}, {"rate": 15.0, "attainment": 1.0}], "bursts": [15.0]}
    text = format_table({**report, "search": search})
    assert "at least 15 req/s, 7.5 req/s per CPU" in text and "probes at 15 req/s ended their arrivals" in text
    assert "at least" not in format_table({**report, "search": {**search, "hi": 30.0}})


def test_slo_parsing():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:3000"]) == SLOs(500.0, 50.0, 3000.0)
    for bad in ("ttft", "itl:5", "ttft:x", "tpot:0"):
        with pytest.raises(WaferError, match="--goodput"):
            parse_slos([bad])


def test_measured_latencies_match_the_fake_servers_delays(capsys):
    # 50 ms to the first chunk, 20 ms between chunks, 2 tokens per chunk: 4 chunks for 8 tokens.
    with serving(ttft=0.05, gap=0.02, tokens_per_chunk=2) as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "8", "--output-len", "8", "--requests", "4")
    run = r["runs"][0]
    assert rc == 0 and run["completed"] == 4 and run["output_tokens"] == 32
    # The fake sends at deadlines from its start, so only the first chunk and the last are bounded
    # below (50 ms and 110 ms after the arrival); above, a busy machine adds its own delays, and
    # the bound only catches a wrong unit.
    assert 50 <= run["ttft_ms"]["median"] < 1000
    assert 110 <= run["e2e_ms"]["median"] < 1000
    # Each request: latency = TTFT + 7 TPOT (TPOT spreads the 3 chunk gaps over the 7 tokens after
    # the first), and its 3 ITL gaps (one per chunk) sum to the same span; so for the means too.
    t, p, i, e = (run[k]["mean"] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"))
    assert e == pytest.approx(t + 7 * p, abs=0.01)  # rounded to the microsecond
    assert i == pytest.approx(7 * p / 3, abs=0.01)


# ------------------------------------------------------------------------------------ arrivals


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (0.25, 2.0), (100.0, 0.1)])
def test_arrival_processes_have_the_asked_rate_and_burstiness(burstiness, cv):
    t = arrival_times(20000, rate=8.0, burstiness=burstiness, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert (len(t) - 1) / t[-1] == pytest.approx(8.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)  # gamma: CV = 1 / sqrt(shape)
    np.testing.assert_array_equal(t, arrival_times(20000, 8.0, burstiness, seed=0))
    assert not np.array_equal(t, arrival_times(20000, 8.0, burstiness, seed=1))
    # The same seed at twice the rate: the same pattern, twice as dense.
    np.testing.assert_allclose(arrival_times(20000, 16.0, burstiness, seed=0), t / 2)


def test_rate_inf_sends_everything_at_once():
    np.testing.assert_array_equal(arrival_times(5, math.inf, 1.0, 0), np.zeros(5))


# --------------------------------------------------------------------------------- rate search


def test_bisection_converges_on_a_step():
    seen = []

    def probe(rate):
        seen.append(rate)
        return 1.0 if rate <= 25.0 else 0.5

    best, probes = find_max_rate(probe, RateSearch(1.0, 100.0, steps=8))
    assert 25.0 * 0.97 <= best <= 25.0  # geometric bisection: 100x range / 2^8 steps
    assert [p["rate"] for p in probes][:2] == [1.0, 100.0] and len(probes) == 10
    assert find_max_rate(lambda r: 0.0, RateSearch(1.0, 100.0, 3))[0] is None
    assert find_max_rate(lambda r: 1.0, RateSearch(1.0, 100.0, 3))[0] == 100.0


def test_rate_search_finds_the_knee_of_a_fixed_capacity_server(capsys):
    # One slot held 60 ms per request (20 ms to the first token, 2 gaps of 20 ms), plus a few ms
    # of HTTP: at most ~16 req/s. Below that TTFT stays ~20 ms; above it each arrival finds the
    # queue longer by the rate excess, so from ~1.2x the knee on, the last of 20 nearly regular
    # arrivals wait past the 150 ms SLO. The 130 ms of slack, and the 2 misses 90% allows,
    # absorb a busy machine's jitter.
    knee = 1 / 0.06
    with serving(ttft=0.02, gap=0.02, slots=1) as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "4", "--output-len", "3", "--requests", "20",
                              "--burstiness", "10000", "--goodput", "ttft:150", "tpot:1000",
                              "--search", "10:40", "--probes", "3", "--cpus", "2")
    assert rc == 0
    s = r["search"]
    probes = {p["rate"]: p["attainment"] for p in s["probes"]}
    assert probes[10.0] >= 0.9 and probes.get(40.0, 1.0) < 0.9, probes
    assert 0.6 * knee <= s["max_rate"] <= 1.35 * knee, probes
    assert s["max_rate_per_cpu"] == pytest.approx(s["max_rate"] / 2, rel=1e-3)
    assert len(r["runs"]) == 2 + 3  # every probe is a run in the report


# ------------------------------------------------------------------------------------ failures


def test_failures_are_counted_not_hidden(capsys):
    # Of 12 requests, 4 are refused (429) and 2 are cut off mid-stream (the 5th and the 10th).
    with serving(fail_every=3, break_every=5) as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "4", "--output-len", "3", "--requests", "12",
                              "--goodput", "ttft:10000", "--warmup", "0")
    run = r["runs"][0]
    assert rc == 0
    assert (run["requests"], run["completed"], run["failed"]) == (12, 6, 6)
    assert run["errors"]["HTTP 429: queue full"] == 4
    assert sum(run["errors"].values()) == 6
    assert run["slo_attainment"] == pytest.approx(0.5)  # failures count against the SLOs


@pytest.mark.parametrize("breaks, error", [("error", "error in stream: decode worker died"),
                                           ("stall", "timed out waiting for the server (silent for 0.5 s, --read-timeout)")])
def test_broken_streams_fail_with_their_reason(capsys, breaks, error):
    with serving(break_every=2, breaks=breaks) as fake:
        t = time.perf_counter()
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "4", "--output-len", "3", "--requests", "4",
                              "--read-timeout", "0.5", "--warmup", "0")
        elapsed = time.perf_counter() - t
    run = r["runs"][0]
    assert rc == 0 and (run["completed"], run["failed"]) == (2, 2)
    assert run["errors"] == {error: 2}
    assert elapsed < 10  # a stalled stream fails at the read timeout, not the server's 60 s


def test_every_request_failing_exits_1_with_the_table(capsys):
    with serving(fail_every=1) as fake:
        rc, out, _ = run_cli(capsys, "bench", "serve", "--url", fake.url, "--input-len", "4", "--output-len", "2",
                             "--requests", "3", "--warmup", "0")
    assert rc == 1
    assert "0 of 3 completed, 3 failed" in out
    assert "3 x HTTP 429: queue full" in out


def test_warm_up_asks_for_few_output_tokens(capsys):
    """The warm-up request has the workload's prompt length but asks for at most 16 tokens (a
    decode-heavy warm-up would otherwise take minutes); the measured requests ask for all."""
    with serving() as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "9", "--output-len", "40", "--requests", "2")
    assert rc == 0 and r["runs"][0]["completed"] == 2
    assert [len(b["prompt"]) for b in fake.bodies] == [9, 9, 9]
    assert [b["max_tokens"] for b in fake.bodies] == [16, 40, 40]


def test_a_failed_warm_up_stops_before_the_load(capsys):
    with serving(fail_every=1) as fake:
        rc, _, err = run_cli(capsys, "bench", "serve", "--url", fake.url, "--requests", "50", "--warmup", "2")
    # Progress lines come first (it got as far as the warm-up); the error is the last line.
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("wafer: error: the warm-up request") and "HTTP 429: queue full" in last, err
    assert len(fake.bodies) == 2  # the warm-up only


def test_max_concurrency_holds_requests_and_their_wait_counts(capsys):
    # Three requests at once, one in flight at a time, 50 ms each to the first (only) token: the
    # third waits for the other two, and open loop counts that wait in its TTFT.
    with serving(ttft=0.05) as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "4", "--output-len", "1", "--requests", "3",
                              "--max-concurrency", "1")
    assert rc == 0 and fake.most_in_flight == 1
    assert r["max_concurrency"] == 1
    ttft = r["runs"][0]["ttft_ms"]
    assert ttft["median"] >= 100 and max(ttft.values()) >= 150
    assert r["runs"][0]["tpot_ms"] is None  # one token each: no TPOT


# ---------------------------------------------------------------------------------- the command


def test_json_shape(capsys):
    with serving() as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--profile", "prefill-heavy", "--output-len", "2", "--requests", "3",
                              "--rates", "50,inf", "--goodput", "ttft:5000", "tpot:5000", "--label", "integrated",
                              "--per-request")
    assert rc == 0
    assert {"label", "url", "model", "profile", "requests", "seed", "burstiness", "max_concurrency", "slos",
            "cpus", "runs", "env", "sweep_max_rate"} <= set(r)
    assert r["label"] == "integrated" and r["model"] == MODEL
    assert r["profile"] == {"name": "custom", "input_len": 2048, "output_len": 2, "spread": 0.0,
                            "vocab_size": 32000}
    assert r["slos"] == {"ttft_ms": 5000.0, "tpot_ms": 5000.0}
    assert [run["rate"] for run in r["runs"]] == [50.0, "inf"]
    for run in r["runs"]:
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(run[key]) == {"mean", "median", "p90", "p99"}
        for key in ("request_throughput", "output_throughput", "goodput", "slo_attainment", "duration_s"):
            assert isinstance(run[key], float)
    assert r["sweep_max_rate"]["max_rate"] == 50.0  # inf is not a rate a server holds
    rows = r["runs"][1]["per_request"]
    assert [row["index"] for row in rows] == [0, 1, 2] and {row["scheduled_s"] for row in rows} == {0.0}
    assert all(row["error"] is None and row["output_tokens"] == 2 and row["ttft_ms"] <= row["e2e_ms"] for row in rows)


def test_the_servers_worker_times_during_each_run_are_recorded(capsys):
    """The server's /metrics histograms are read before and after each run: the warm-up request is
    not counted; each run's 4 requests of 6 tokens are (4 batches of 50 ms, 4 x 5 steps of 20 ms).
    A server without them (404) gives no `worker_times`."""
    with serving(worker_metrics=True) as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "8", "--output-len", "6", "--requests", "4",
                              "--rates", "inf,inf", "--warmup", "1")
    assert rc == 0
    for run in r["runs"]:
        assert run["worker_times"] == {"prefill_batch": {"count": 4, "mean_ms": 50.0},
                                       "decode_step": {"count": 20, "mean_ms": 20.0}}
    with serving() as fake:
        rc, r, _ = bench_json(capsys, fake.url, "--input-len", "8", "--output-len", "2", "--requests", "2")
    assert rc == 0 and "worker_times" not in r["runs"][0]


def test_table_sweep_plot_and_compare(capsys, tmp_path):
    saved = []
    with serving(ttft=0.002) as fake:
        for label in ("disaggregated", "integrated"):
            rc, out, _ = run_cli(capsys, "bench", "serve", "--url", fake.url, "--input-len", "4", "--output-len", "3",
                                 "--requests", "4", "--rates", "100,200", "--goodput", "ttft:1000", "--label", label,
                                 "--json")
            assert rc == 0
            saved.append(tmp_path / f"{label}.json")
            saved[-1].write_text(out)
        rc, table, err = run_cli(capsys, "bench", "serve", "--url", fake.url, "--input-len", "4", "--output-len",
                                 "3", "--requests", "4", "--rate", "100")
    assert rc == 0
    for label in ("target", "workload", "rate", "throughput", "TTFT ms", "TPOT ms", "ITL ms", "E2E ms"):
        assert any(line.startswith(label) for line in table.splitlines()), label
    plot = tmp_path / "compare.png"
    rc, out, _ = run_cli(capsys, "bench", "serve", "--compare", *map(str, saved), "--plot", str(plot))
    assert rc == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    lines = out.splitlines()
    assert sum("disaggregated" in line for line in lines) >= 2 and sum("integrated" in line for line in lines) >= 2


def test_unreachable_server_is_one_line_exit_2(capsys):
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        rc, _, err = run_cli(capsys, "bench", "serve", "--url", f"http://127.0.0.1:{port}", "--requests", "1")
    assert_one_line_error(rc, err, "cannot reach the server", str(port))


@pytest.mark.parametrize("argv, fragment", [
    (["--search", "1:8"], "--search needs --goodput"),
    (["--search", "8:1", "--goodput", "ttft:5"], "0 < LO < HI"),
    (["--search", "a:b", "--goodput", "ttft:5"], "LO:HI"),
    (["--goodput", "itl:5"], "--goodput takes KEY:MS"),
    (["--spread", "1.5"], "--spread"),
    (["--rate", "0"], "must be positive"),
    (["--rate", "2", "--rates", "1,2"], "not allowed with"),
    (["--compare", "/no/such.json"], "/no/such.json"),
])
def test_bad_flags_are_one_line(capsys, argv, fragment):
    with serving() as fake:
        rc, _, err = run_cli(capsys, "bench", "serve", "--url", fake.url, *argv)
    assert_one_line_error(rc, err, fragment)
    assert not fake.bodies  # nothing was sent
