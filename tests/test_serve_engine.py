"""The serving engine driving its real worker processes (serve/engine.py), on a tiny checkpoint.

Each engine runs on an event loop in a thread of its own, as it would under the HTTP front end;
tests hand it coroutines and wait for them with a deadline. Greedy outputs are compared with the
single-device generator token for token; faults are real (a worker SIGKILLed, a KV stream the
decode worker refuses), and afterwards no worker process is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from multiprocessing import resource_tracker

import pytest

from mesh.executors import Grid
from serve.engine import WorkerEngine, split_cpus
from serve.events import Deadlines, FailReason, FinishReason, Mode, SchedulerConfig
from serve.metrics import ServeMetrics
from serve.options import EngineOptions
from serve.requests import Done, Failed, GenerateRequest, TokenOut
from serve.worker_spec import Faults, Role

# Whole-call limit of anything a test waits for (starting workers included). Typically 5-20 s.
WAIT_S = 240
SLOTS = 4
MAX_WAITING = 4
PROMPTS = [[5, 9, 100, 7, 300, 11, 12, 40, 41], [3, 1, 4, 1, 5, 9, 2, 6], [17, 42],
           [8, 8, 8, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217],
           [99, 98, 97, 96, 95]]
NEW_TOKENS = 10
LONG = 48  # new tokens of a request still decoding when a worker is killed


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    """The tiny Llama of conftest's tiny_checkpoint with weights drawn at std 0.2 (HF's default
    0.02 gives nearly flat logits, where a float rounding may flip a greedy choice between two
    meshes and make the comparison meaningless). Its EOS token is the one HF's greedy decode of
    PROMPTS[0] produces fourth, so a request that honours EOS stops there, after a decode step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-sharp")
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    model.config.eos_token_id = ids[-1]
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(sharp_checkpoint):
    """Greedy tokens of the single-device generator, by prompt (EOS ignored)."""
    from model.generate import Generator
    from model.load import load_model
    loaded = load_model(checkpoint=sharp_checkpoint)
    gen = Generator(loaded.params, loaded.config)
    cache = {}

    def tokens(prompt, n=NEW_TOKENS):
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = gen.generate([list(prompt)], n, stop_on_eos=False).tokens[0]
        return cache[key]
    return tokens


class LoopThread:
    """An event loop in a thread: the engine lives there; tests wait on it with a deadline."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = WAIT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args):
        async def call():
            return fn(*args)
        return self.run(call())

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def options(checkpoint, mode, **scheduler) -> EngineOptions:
    sched = SchedulerConfig(slots=SLOTS, max_waiting=MAX_WAITING, deadlines=Deadlines(60, 60, 60, 60), **scheduler)
    return EngineOptions(checkpoint=checkpoint, mode=mode, prefill_grid=Grid(1, 1), decode_grid=Grid(2, 2),
                         max_len=128, scheduler=sched)


class Running:
    """A started engine and its loop; `stop()` stops it and checks every worker is reaped."""

    def __init__(self, opts: EngineOptions, faults: Faults = Faults()):
        self.lt = LoopThread()
        self.metrics = ServeMetrics()
        self.engine = WorkerEngine(opts, self.metrics, faults=faults)
        self.lt.run(self.engine.start())

    def generate(self, prompt, n=NEW_TOKENS, rid=None, **kw):
        return self.lt.run(collect(self.engine, request(prompt, n, rid, **kw)))

    def stop(self):
        pids = list(self.engine.pids().values())
        try:
            self.lt.run(self.engine.stop(), 60)
        finally:
            self.lt.close()
        assert self.engine.pids() == {}
        for pid in pids:
            with pytest.raises(ProcessLookupError):  # reaped: not even a zombie is left
                os.kill(pid, 0)


_ids = iter(range(1_000_000))


def request(prompt, n=NEW_TOKENS, rid=None, **kw) -> GenerateRequest:
    return GenerateRequest(rid or f"r{next(_ids)}", tuple(prompt), n, ignore_eos=kw.pop("ignore_eos", True), **kw)


async def drain(stream) -> tuple[list[int], object]:
    """(tokens, the Done or Failed that ended the stream, or None if it just ended)."""
    tokens, end = [], None
    async for out in stream:
        if isinstance(out, TokenOut):
            tokens.append(out.token)
        else:
            end = out
    return tokens, end


async def collect(engine, req):
    return await drain(engine.submit(req))


async def poll(condition, timeout_s: float = WAIT_S, what: str = "condition"):
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def assert_done(result, want_tokens, reason=FinishReason.LENGTH):
    tokens, end = result
    assert isinstance(end, Done), end
    assert end.reason is reason
    assert tokens == want_tokens
    assert end.times.output_tokens == len(tokens)


@pytest.fixture(scope="module")
def disaggregated(sharp_checkpoint):
    running = Running(options(sharp_checkpoint, Mode.DISAGGREGATED), Faults(wrong_fingerprint=frozenset({"refused"})))
    yield running
    running.stop()


def test_disaggregated_greedy_equals_the_generator_solo_and_concurrent(disaggregated, reference):
    d = disaggregated
    assert d.engine.capacity == 128 and d.engine.config.vocab_size == 512
    # Each worker is pinned to its own CPUs: disjoint halves of this process's (shared on one CPU).
    pids = d.engine.pids()
    prefill_cpus, decode_cpus = (os.sched_getaffinity(pids[r]) for r in ("prefill", "decode"))
    assert prefill_cpus | decode_cpus == os.sched_getaffinity(0)
    assert not prefill_cpus & decode_cpus or len(os.sched_getaffinity(0)) == 1
    assert_done(d.generate(PROMPTS[0]), reference(PROMPTS[0]))

    async def together():
        return await asyncio.gather(*(collect(d.engine, request(p)) for p in PROMPTS))
    for prompt, result in zip(PROMPTS, d.lt.run(together())):
        assert_done(result, reference(prompt))
    state = d.lt.call(d.engine.state)
    assert state.ready and state.slots_in_use == 0 and state.waiting == 0
    # Every cache went over TCP, and each step and handoff was recorded.
    registry = d.metrics.registry
    assert registry.get_sample_value("wafer_kv_handoff_bytes_count") == 1 + len(PROMPTS)
    assert registry.get_sample_value("wafer_kv_handoff_bytes_sum") > 0
    assert registry.get_sample_value("wafer_decode_step_seconds_count") >= NEW_TOKENS - 1
    assert registry.get_sample_value("wafer_prefill_batch_seconds_count") >= 2


def test_eos_ends_a_request_unless_it_is_ignored(disaggregated, reference):
    d = disaggregated
    (eos,) = d.engine.config.eos_token_ids
    want = reference(PROMPTS[0])
    assert eos in want[1:]  # produced by a decode step, not by the prefill
    assert_done(d.generate(PROMPTS[0], ignore_eos=False), want[: want.index(eos) + 1], FinishReason.EOS)
    assert_done(d.generate(PROMPTS[0], ignore_eos=True), want)
    assert_done(d.generate(PROMPTS[0], 1), want[:1])  # ended by its prefill: the cache is dropped, never shipped
    assert d.lt.call(d.engine.state).slots_in_use == 0


def test_each_request_samples_as_it_asked_next_to_greedy_ones(disaggregated, sharp_checkpoint, reference):
    """Seeded sampling through the engine equals the single-device generator with the same
    Sampling (the key of position p is fold_in(key(seed), p) on every mesh), whatever else shares
    the batch; a greedy request beside it stays exact, and the same seed repeats."""
    from model.generate import Generator
    from model.load import load_model
    from model.sampling import Sampling
    d = disaggregated
    hot = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    loaded = load_model(checkpoint=sharp_checkpoint)
    want = Generator(loaded.params, loaded.config).generate([PROMPTS[1]], NEW_TOKENS, hot,
                                                            stop_on_eos=False).tokens[0]
    assert want != reference(PROMPTS[1])  # the sampled run is not the greedy one

    async def mixed():
        return await asyncio.gather(collect(d.engine, request(PROMPTS[1], sampling=hot)),
                                    collect(d.engine, request(PROMPTS[0])),
                                    collect(d.engine, request(PROMPTS[1], sampling=hot)))
    first, greedy, again = d.lt.run(mixed())
    assert_done(first, want)
    assert_done(again, want)
    assert_done(greedy, reference(PROMPTS[0]))


def test_a_refused_kv_stream_fails_that_request_only(disaggregated, reference):
    d = disaggregated

    async def both():
        return await asyncio.gather(collect(d.engine, request(PROMPTS[1], rid="refused")),
                                    collect(d.engine, request(PROMPTS[2])))
    (tokens, end), fine = d.lt.run(both())
    assert isinstance(end, Failed) and end.reason is FailReason.HANDOFF_REFUSED, end
    assert "model mismatch" in end.detail
    assert tokens == reference(PROMPTS[1])[:1]  # its first token came from the prefill
    assert_done(fine, reference(PROMPTS[2]))
    # The refused slot was given back: every slot takes a request again.
    async def full():
        return await asyncio.gather(*(collect(d.engine, request(p)) for p in PROMPTS[:SLOTS]))
    for prompt, result in zip(PROMPTS, d.lt.run(full())):
        assert_done(result, reference(prompt))


def test_cancel_and_finish_free_the_slot(disaggregated, reference):
    d = disaggregated

    async def scenario():
        eng = d.engine
        cancelled = eng.submit(request(PROMPTS[0], LONG, rid="cancelled"))
        finished = eng.submit(request(PROMPTS[1], LONG, rid="finished"))
        got = {"cancelled": [], "finished": []}
        for name, stream in (("cancelled", cancelled), ("finished", finished)):
            async for out in stream:
                got[name].append(out.token)
                if len(got[name]) == 3:
                    break
        eng.cancel("cancelled")
        eng.finish("finished")
        assert eng.state().slots_in_use == 0  # in the scheduler's books at once
        rest_c = await drain(cancelled)
        rest_f = await drain(finished)
        return got, rest_c, rest_f
    got, (more_c, end_c), (more_f, end_f) = d.lt.run(scenario())
    assert end_c is None  # a cancelled request's stream just ends
    assert isinstance(end_f, Done) and end_f.reason is FinishReason.STOP
    assert (got["cancelled"] + more_c) == reference(PROMPTS[0], LONG)[:3 + len(more_c)]
    assert len(got["cancelled"] + more_c) < LONG and len(got["finished"] + more_f) < LONG  # cut short
    assert end_f.times.output_tokens == len(got["finished"] + more_f)
    # The decode worker freed them too: all slots serve again, exactly.
    async def full():
        return await asyncio.gather(*(collect(d.engine, request(p)) for p in PROMPTS[:SLOTS]))
    for prompt, result in zip(PROMPTS, d.lt.run(full())):
        assert_done(result, reference(prompt))


def test_a_full_queue_rejects_with_retry_after(disaggregated, reference):
    d = disaggregated

    async def burst():
        # Submitted in one go: the first starts its prefill at once, MAX_WAITING wait, the rest
        # find the queue full.
        streams = [d.engine.submit(request(PROMPTS[i % len(PROMPTS)])) for i in range(MAX_WAITING + 3)]
        return await asyncio.gather(*(drain(s) for s in streams))
    results = d.lt.run(burst())
    for i, result in enumerate(results[: MAX_WAITING + 1]):
        assert_done(result, reference(PROMPTS[i % len(PROMPTS)]))
    for tokens, end in results[MAX_WAITING + 1:]:
        assert tokens == [] and isinstance(end, Failed) and end.reason is FailReason.QUEUE_FULL
        assert end.retry_after_s == SchedulerConfig().retry_after_s


def _wait_until_dead(pid, timeout_s: float = 30.0) -> None:
    """Block (the engine's event loop too, on purpose) until `pid` has exited: a zombie, its pipe
    closed. The engine reaps it only once its loop runs again, so the state stays 'Z' until then."""
    end = time.monotonic() + timeout_s
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        if time.monotonic() > end:
            raise AssertionError(f"worker {pid} still running {timeout_s} s after SIGKILL")
        time.sleep(0.005)


def _kill_then_submit(d, role, prompt):
    """SIGKILL the `role` worker and, before the engine can notice, submit `prompt`.

    The submit waits until the worker has really exited, so its closed pipe is already readable
    when the loop next runs and the engine learns of the death before any report `prompt` can
    cause: without the wait, a prefill worker fast enough to report `prompt`'s prefill before the
    dying decode worker's pipe closed got it a slot on the dead worker (TRANSFERRING), and the
    death then failed it too (test_a_killed_decode_worker_fails_only_its_requests flaked so)."""
    async def go():
        pid = d.engine.pids()[role]
        os.kill(pid, signal.SIGKILL)
        _wait_until_dead(pid)
        return d.engine.submit(request(prompt))
    return go()


def test_a_killed_prefill_worker_fails_only_its_requests(disaggregated, reference):
    d = disaggregated
    eng = d.engine

    async def scenario():
        decoding = eng.submit(request(PROMPTS[0], LONG))
        first = [await anext(decoding), await anext(decoding)]  # the second came from a decode step
        assert all(isinstance(t, TokenOut) for t in first)
        doomed = await _kill_then_submit(d, "prefill", PROMPTS[1])  # its prefill went to a dead worker
        lost = await drain(doomed)
        rest = await drain(decoding)
        await poll(lambda: eng.is_ready("prefill"), what="prefill worker restarted")
        later = await collect(eng, request(PROMPTS[2]))
        return lost, ([t.token for t in first] + rest[0], rest[1]), later
    (lost_tokens, lost_end), survivor, later = d.lt.run(scenario())
    assert lost_tokens == [] and isinstance(lost_end, Failed) and lost_end.reason is FailReason.WORKER_DIED
    assert_done(survivor, reference(PROMPTS[0], LONG))
    assert_done(later, reference(PROMPTS[2]))
    assert d.metrics.registry.get_sample_value("wafer_worker_restarts_total", {"worker": "prefill"}) == 1


def test_a_killed_decode_worker_fails_only_its_requests(disaggregated, reference):
    d = disaggregated
    eng = d.engine

    async def scenario():
        decoding = eng.submit(request(PROMPTS[0], LONG))
        first = [await anext(decoding), await anext(decoding)]  # the second came from a decode step
        assert all(isinstance(t, TokenOut) for t in first)
        waiting = await _kill_then_submit(d, "decode", PROMPTS[3])  # prefilled, waits for a slot
        lost = await drain(decoding)
        kept = await drain(waiting)
        later = await collect(eng, request(PROMPTS[4]))
        return ([t.token for t in first] + lost[0], lost[1]), kept, later
    (lost_tokens, lost_end), kept, later = d.lt.run(scenario())
    assert isinstance(lost_end, Failed) and lost_end.reason is FailReason.WORKER_DIED
    assert lost_tokens == reference(PROMPTS[0], LONG)[:len(lost_tokens)]
    assert_done(kept, reference(PROMPTS[3]))
    assert_done(later, reference(PROMPTS[4]))
    assert d.metrics.registry.get_sample_value("wafer_worker_restarts_total", {"worker": "decode"}) == 1


def test_integrated_greedy_equals_the_generator_and_stop_reaps(sharp_checkpoint, reference):
    # The first spawned process of a session starts multiprocessing's resource tracker, which keeps
    # a pipe open for the session: not the engine's, so it is started before the count.
    resource_tracker.ensure_running()
    fds = len(os.listdir("/proc/self/fd"))
    running = Running(options(sharp_checkpoint, Mode.INTEGRATED))
    try:
        assert running.engine.capacity == 128
        assert_done(running.generate(PROMPTS[0]), reference(PROMPTS[0]))

        async def together():
            return await asyncio.gather(*(collect(running.engine, request(p)) for p in PROMPTS))
        for prompt, result in zip(PROMPTS, running.lt.run(together())):
            assert_done(result, reference(prompt))

        async def in_flight():  # stop() fails what is still running
            stream = running.engine.submit(request(PROMPTS[0], LONG))
            await anext(stream)
            await running.engine.stop()
            return await drain(stream)
        _, end = running.lt.run(in_flight())
        assert isinstance(end, Failed) and end.reason is FailReason.WORKER_DIED
    finally:
        running.stop()
    assert len(os.listdir("/proc/self/fd")) == fds  # pipes and sockets all closed


def test_options_the_engine_cannot_run_are_refused():
    from mesh.errors import WaferError
    with pytest.raises(WaferError, match="transport 'udp'"):
        WorkerEngine(EngineOptions(transport="udp"), ServeMetrics())
    with pytest.raises(WaferError, match="not a non-empty subset"):
        WorkerEngine(EngineOptions(prefill_cpus=(10_000,)), ServeMetrics())
    with pytest.raises(WaferError, match="checkpoint not found"):
        WorkerEngine(EngineOptions(checkpoint="/no/such/folder"), ServeMetrics())
    mine = tuple(sorted(os.sched_getaffinity(0)))
    assert split_cpus(EngineOptions(mode=Mode.INTEGRATED)) == {Role.INTEGRATED: mine}
    assert split_cpus(EngineOptions(prefill_cpus=mine[:1], decode_cpus=mine[-1:])) == {
        Role.PREFILL: mine[:1], Role.DECODE: mine[-1:]}


@pytest.mark.slow  # 30-90 s: an engine of its own, and a decode worker restarted
def test_a_hung_decode_worker_is_killed_at_its_deadline_and_restarted(sharp_checkpoint, reference):
    opts = options(sharp_checkpoint, Mode.DISAGGREGATED)
    token_s = 3.0
    opts = dataclasses.replace(opts, scheduler=dataclasses.replace(opts.scheduler,
                                                                  deadlines=Deadlines(60, 60, 60, token_s)))
    running = Running(opts)
    eng = running.engine
    try:
        async def scenario():
            stream = eng.submit(request(PROMPTS[0], LONG))
            first = [await anext(stream), await anext(stream)]
            hung = eng.pids()["decode"]
            os.kill(hung, signal.SIGSTOP)  # alive, its pipe open, but it never answers again
            t0 = time.monotonic()
            lost = await drain(stream)
            waited = time.monotonic() - t0
            await poll(lambda: eng.is_ready("decode") and eng.pids()["decode"] != hung, what="decode worker restarted")
            later = await collect(eng, request(PROMPTS[1]))
            return first, lost, waited, later
        first, (tokens, end), waited, later = running.lt.run(scenario())
        assert isinstance(end, Failed) and end.reason is FailReason.DEADLINE, end
        assert waited < token_s + 5  # failed at its deadline, not whenever the worker might answer
        assert_done(later, reference(PROMPTS[1]))
        assert running.metrics.registry.get_sample_value("wafer_worker_restarts_total", {"worker": "decode"}) == 1
    finally:
        running.stop()


@pytest.mark.slow  # 30-60 s: an engine of its own, restarted once
def test_a_killed_integrated_worker_fails_its_requests_and_is_restarted(sharp_checkpoint, reference):
    running = Running(options(sharp_checkpoint, Mode.INTEGRATED))
    eng = running.engine
    try:
        async def scenario():
            stream = eng.submit(request(PROMPTS[0], LONG))
            first = [await anext(stream), await anext(stream)]
            os.kill(eng.pids()["integrated"], signal.SIGKILL)
            lost = await drain(stream)
            await poll(lambda: eng.is_ready("integrated"), what="integrated worker restarted")
            return [t.token for t in first] + lost[0], lost[1], await collect(eng, request(PROMPTS[1]))
        tokens, end, later = running.lt.run(scenario())
        assert isinstance(end, Failed) and end.reason is FailReason.WORKER_DIED
        assert tokens == reference(PROMPTS[0], LONG)[:len(tokens)]
        assert_done(later, reference(PROMPTS[1]))
    finally:
        running.stop()


@pytest.mark.slow  # 30-60 s: an engine of its own
def test_the_jax_transfer_handoff_decodes_exactly(sharp_checkpoint, reference):
    opts = options(sharp_checkpoint, Mode.DISAGGREGATED)
    running = Running(dataclasses.replace(opts, transport="jax"),
                      Faults(wrong_fingerprint=frozenset({"refused"})))
    try:
        async def together():
            return await asyncio.gather(*(collect(running.engine, request(p)) for p in PROMPTS[:3]),
                                        collect(running.engine, request(PROMPTS[3], rid="refused")))
        *fine, (_, refused) = running.lt.run(together())
        for prompt, result in zip(PROMPTS, fine):
            assert_done(result, reference(prompt))
        assert isinstance(refused, Failed) and refused.reason is FailReason.HANDOFF_REFUSED
        assert running.metrics.registry.get_sample_value("wafer_kv_handoff_bytes_count") == 3
    finally:
        running.stop()
