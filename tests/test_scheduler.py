"""The serving scheduler on hand-written event sequences with hand-computed decisions, the vLLM
metric definitions on hand-computed timings, and random event sequences checked against the
scheduler's invariants after every event."""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.events import (Arrival, Deadlines, Decision, Disconnect, FailReason, Failure, Finished, FinishReason,
                          HandoffDone, HandoffFailed, Mode, Placement, PrefillDone, PrefillOutcome, SchedulerConfig,
                          SlotToken, Stage, StepDone, Tick, Token, Worker, WorkerDied, WorkerReady)
from serve.scheduler import Scheduler
from serve.timings import RequestTimes, e2e_latency, itl, tpot, ttft

DIS, INT = Mode.DISAGGREGATED, Mode.INTEGRATED
SHORT = Deadlines(queue_s=5, prefill_s=3, handoff_s=4, token_s=2)


def prefilled(time, *outcomes):
    """A PrefillDone whose outcomes are (request id, token) pairs or PrefillOutcomes."""
    return PrefillDone(time, tuple(o if isinstance(o, PrefillOutcome) else PrefillOutcome(*o) for o in outcomes))


def stepped(time, *tokens):
    """A StepDone from (request id, slot, token[, finish]) tuples."""
    return StepDone(time, tuple(SlotToken(*t) for t in tokens))


def queue_then_prefill(s: Scheduler, time: float, rids: str, max_new_tokens: int) -> Decision:
    """Arrivals at `time` while the prefill worker restarts, so that they are prefilled as one batch."""
    s.handle(WorkerDied(time, Worker.PREFILL))
    for rid in rids:
        s.handle(Arrival(time, rid, 4, max_new_tokens))
    return s.handle(WorkerReady(time, Worker.PREFILL))


def times(arrival, tokens, finish):
    return RequestTimes(arrival, tuple(tokens), finish)


def failure(rid, reason, stage, arrival, tokens, finish, **kw):
    return Failure(rid, reason, stage, times(arrival, tokens, finish), **kw)


def test_the_scheduler_is_pure():
    """No clock, socket, thread, JAX or worker code: the same scheduler runs on any clock."""
    allowed = {"__future__", "collections", "dataclasses", "enum", "heapq", "math", "serve.events", "serve.timings"}
    for name in ("scheduler", "events", "timings"):
        tree = ast.parse((pathlib.Path(__file__).parent.parent / "serve" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= allowed, (name, imported - allowed)


# Metrics: the definitions of `vllm bench serve`, on hand-computed timings.

def test_request_metrics_by_hand():
    t = times(0.0, (1.0, 1.5, 2.5, 3.0), 3.0)
    assert ttft(t) == 1.0
    assert e2e_latency(t) == 3.0
    assert tpot(t) == pytest.approx(2.0 / 3)  # (3 - 1) / (4 - 1)
    assert itl(t) == (0.5, 1.0, 0.5)


def test_single_token_has_no_tpot_and_no_token_no_ttft():
    assert tpot(times(2.0, (2.5,), 2.5)) is None
    assert itl(times(2.0, (2.5,), 2.5)) == ()
    with pytest.raises(ValueError, match="no time to first token"):
        ttft(times(2.0, (), 4.0))


# Disaggregated mode.

def test_one_request_from_arrival_to_finish():
    s = Scheduler(SchedulerConfig(slots=2))
    assert s.handle(Arrival(0.0, "a", 10, 3)) == Decision(prefill=("a",))
    assert s.handle(prefilled(1.0, ("a", 11))) == Decision(placements=(Placement("a", 0),), tokens=(Token("a", 11),))
    assert s.stage_of("a") is Stage.TRANSFERRING
    assert s.handle(HandoffDone(1.5, "a", 0)) == Decision(decode_step=True)
    assert s.handle(stepped(2.0, ("a", 0, 12))) == Decision(decode_step=True, tokens=(Token("a", 12),))
    last = s.handle(stepped(3.0, ("a", 0, 13)))
    assert last == Decision(evict=(0,), tokens=(Token("a", 13),),
                            finished=(Finished("a", FinishReason.LENGTH, times(0.0, (1.0, 2.0, 3.0), 3.0)),))
    assert tpot(last.finished[0].times) == 1.0  # (3 - 1) / (3 - 1)
    assert s.live_ids() == () and s.slot_holders() == {} and s.next_deadline() is None


def test_prefill_batches_are_fcfs_and_bounded_by_size_and_tokens():
    s = Scheduler(SchedulerConfig(max_prefill_batch=2, max_prefill_tokens=100))
    assert s.handle(Arrival(0.0, "a", 50, 1)).prefill == ("a",)
    for rid, n in (("b", 60), ("c", 30), ("d", 10), ("e", 200)):
        assert s.handle(Arrival(0.5, rid, n, 1)) == Decision()
    # One new token each: they finish at prefill and their caches are never shipped.
    assert s.handle(prefilled(1.0, ("a", 7))) == Decision(
        discard=("a",), prefill=("b", "c"), tokens=(Token("a", 7),),
        finished=(Finished("a", FinishReason.LENGTH, times(0.0, (1.0,), 1.0)),))
    assert s.handle(prefilled(2.0, ("b", 1), ("c", 2))).prefill == ("d",)  # 10 + 200 tokens > 100
    assert s.handle(prefilled(3.0, ("d", 3))).prefill == ("e",)  # alone, though over the budget
    assert s.waiting_ids() == ()


def test_a_full_queue_rejects_with_a_retry_hint():
    s = Scheduler(SchedulerConfig(max_waiting=2, retry_after_s=1.5))
    for rid in "abc":
        s.handle(Arrival(0.0, rid, 4, 2))
    assert s.waiting_ids() == ("b", "c")  # a is prefilling
    assert s.handle(Arrival(0.5, "d", 4, 2)) == Decision(
        failed=(Failure("d", FailReason.QUEUE_FULL, None, times(0.5, (), 0.5), retry_after_s=1.5),))
    assert s.stage_of("d") is None
    assert s.handle(prefilled(1.0, ("a", 1))).prefill == ("b", "c")
    assert s.handle(Arrival(1.5, "e", 4, 2)) == Decision()
    assert s.waiting_ids() == ("e",)


def test_the_handoff_queue_is_bounded_and_a_freed_slot_is_reused_at_once():
    s = Scheduler(SchedulerConfig(slots=1, max_prefill_batch=1, max_prefilled=2))
    s.handle(Arrival(0.0, "a", 4, 2))
    for rid in "bcd":
        s.handle(Arrival(0.0, rid, 4, 5))
    assert s.handle(prefilled(1.0, ("a", 1))) == Decision(placements=(Placement("a", 0),), prefill=("b",),
                                                          tokens=(Token("a", 1),))
    assert s.handle(HandoffDone(2.0, "a", 0)) == Decision(decode_step=True)
    assert s.handle(prefilled(3.0, ("b", 2))) == Decision(prefill=("c",), tokens=(Token("b", 2),))
    # b waits for a slot and c is prefilled: the prefill side holds two caches, its bound.
    assert s.handle(prefilled(4.0, ("c", 3))) == Decision(tokens=(Token("c", 3),))
    assert s.handoff_ids() == ("b", "c") and s.waiting_ids() == ("d",)
    assert s.handle(stepped(5.0, ("a", 0, 9))) == Decision(
        evict=(0,), placements=(Placement("b", 0),), prefill=("d",), tokens=(Token("a", 9),),
        finished=(Finished("a", FinishReason.LENGTH, times(0.0, (1.0, 5.0), 5.0)),))
    assert s.slot_holders() == {0: "b"}


def every_stage(mode: Mode = DIS) -> Scheduler:
    """d decoding in slot 0, t transferring into slot 1, p prefilled, f prefilling, w waiting; a
    decode step in flight. Token i of the prefill comes at time i."""
    s = Scheduler(SchedulerConfig(mode=mode, slots=2, max_prefill_batch=1))
    for rid in "dtpfw":
        s.handle(Arrival(0.0, rid, 4, 10))
    s.handle(prefilled(1.0, ("d", 1)))
    s.handle(HandoffDone(2.0, "d", 0))
    s.handle(prefilled(3.0, ("t", 3)))
    s.handle(prefilled(4.0, ("p", 4)))
    assert {rid: s.stage_of(rid) for rid in "dtpfw"} == {
        "d": Stage.DECODING, "t": Stage.TRANSFERRING, "p": Stage.PREFILLED, "f": Stage.PREFILLING, "w": Stage.WAITING}
    assert s.slot_holders() == {0: "d", 1: "t"}
    return s


GONE = FailReason.DISCONNECTED


@pytest.mark.parametrize("rid, expected", [
    ("w", Decision(failed=(failure("w", GONE, Stage.WAITING, 0.0, (), 5.0),))),
    ("f", Decision(failed=(failure("f", GONE, Stage.PREFILLING, 0.0, (), 5.0),))),
    ("p", Decision(discard=("p",), failed=(failure("p", GONE, Stage.PREFILLED, 0.0, (4.0,), 5.0),))),
    # The reserved slot is aborted and at once given to the cache waiting in the handoff queue.
    ("t", Decision(evict=(1,), discard=("t",), placements=(Placement("p", 1),),
                   failed=(failure("t", GONE, Stage.TRANSFERRING, 0.0, (3.0,), 5.0),))),
    ("d", Decision(evict=(0,), placements=(Placement("p", 0),),
                   failed=(failure("d", GONE, Stage.DECODING, 0.0, (1.0,), 5.0),))),
])
def test_a_disconnect_frees_what_the_request_holds(rid, expected):
    s = every_stage()
    assert s.handle(Disconnect(5.0, rid)) == expected
    assert s.stage_of(rid) is None and rid not in s.slot_holders().values()
    assert s.handle(Disconnect(5.5, rid)) == Decision()  # it ended once


def test_events_about_an_ended_request_are_ignored():
    s = every_stage()
    s.handle(Disconnect(5.0, "f"))
    # The batch finishes anyway: its cache is dropped, the prefill worker takes the next prompt.
    assert s.handle(prefilled(6.0, ("f", 6))) == Decision(discard=("f",), prefill=("w",))
    s.handle(Disconnect(6.5, "d"))  # slot 0 goes to p
    # The step dispatched before the disconnect still carries d's token; it is dropped.
    assert s.handle(stepped(7.0, ("d", 0, 9))) == Decision()
    s.handle(Disconnect(7.5, "t"))
    assert s.handle(HandoffDone(8.0, "t", 1)) == Decision()
    assert s.slot_holders() == {0: "p"}


def test_a_refused_kv_stream_fails_that_request_only():
    s = Scheduler(SchedulerConfig(slots=1))
    assert queue_then_prefill(s, 0.0, "ab", 5) == Decision(prefill=("a", "b"))
    s.handle(prefilled(1.0, ("a", 1), ("b", 2)))
    assert s.handle(HandoffFailed(2.0, "a", "checksum mismatch")) == Decision(
        evict=(0,), discard=("a",), placements=(Placement("b", 0),),
        failed=(failure("a", FailReason.HANDOFF_REFUSED, Stage.TRANSFERRING, 0.0, (1.0,), 2.0,
                        detail="checksum mismatch"),))


def test_failed_and_missing_prefill_results_fail_their_requests():
    s = Scheduler(SchedulerConfig())
    queue_then_prefill(s, 0.0, "abc", 5)
    assert s.handle(prefilled(1.0, ("a", None), ("b", 2))) == Decision(
        discard=("c",), placements=(Placement("b", 0),), tokens=(Token("b", 2),),
        failed=(failure("a", FailReason.PREFILL_FAILED, Stage.PREFILLING, 0.0, (), 1.0),
                failure("c", FailReason.PREFILL_FAILED, Stage.PREFILLING, 0.0, (), 1.0,
                        detail="no result from the prefill batch")))


def test_prefill_worker_death_fails_exactly_the_caches_it_held():
    s = every_stage()
    assert s.handle(WorkerDied(5.0, Worker.PREFILL)) == Decision(evict=(1,), failed=(
        failure("f", FailReason.WORKER_DIED, Stage.PREFILLING, 0.0, (), 5.0),
        failure("p", FailReason.WORKER_DIED, Stage.PREFILLED, 0.0, (4.0,), 5.0),
        failure("t", FailReason.WORKER_DIED, Stage.TRANSFERRING, 0.0, (3.0,), 5.0)))
    assert s.handle(prefilled(6.0, ("f", 6))) == Decision()  # the dead worker's last words
    assert s.handle(Arrival(6.5, "x", 4, 2)) == Decision()  # waits for the restart
    assert s.handle(WorkerReady(7.0, Worker.PREFILL)) == Decision(prefill=("w",))
    assert s.stage_of("d") is Stage.DECODING


def test_decode_worker_death_fails_exactly_the_slots_it_held():
    s = every_stage()
    assert s.handle(WorkerDied(5.0, Worker.DECODE)) == Decision(discard=("t",), failed=(
        failure("t", FailReason.WORKER_DIED, Stage.TRANSFERRING, 0.0, (3.0,), 5.0),
        failure("d", FailReason.WORKER_DIED, Stage.DECODING, 0.0, (1.0,), 5.0)))
    assert s.slot_holders() == {}
    assert s.handle(stepped(5.5, ("d", 0, 9))) == Decision()
    # Prefill carries on while the decode worker restarts; then its fresh batch takes p.
    assert s.handle(prefilled(6.0, ("f", 6))) == Decision(prefill=("w",), tokens=(Token("f", 6),))
    assert s.handle(WorkerReady(7.0, Worker.DECODE)) == Decision(placements=(Placement("p", 0), Placement("f", 1)))


# Deadlines.

def test_a_waiting_request_fails_at_its_queue_deadline():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    s.handle(WorkerDied(0.0, Worker.PREFILL))
    s.handle(Arrival(1.0, "a", 4, 2))
    assert s.next_deadline() == 6.0
    assert s.handle(Tick(5.5)) == Decision()
    assert s.handle(Tick(6.0)) == Decision(failed=(failure("a", FailReason.DEADLINE, Stage.WAITING, 1.0, (), 6.0),))
    assert s.next_deadline() is None


def test_a_hung_prefill_worker_is_restarted():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    s.handle(Arrival(0.0, "a", 4, 2))
    s.handle(Arrival(1.0, "b", 4, 2))
    assert s.next_deadline() == 3.0  # a's batch: 0 + 3
    assert s.handle(Tick(3.0)) == Decision(restart=(Worker.PREFILL,), failed=(
        failure("a", FailReason.DEADLINE, Stage.PREFILLING, 0.0, (), 3.0),))
    assert s.handle(WorkerDied(3.5, Worker.PREFILL)) == Decision()
    assert s.handle(WorkerReady(4.0, Worker.PREFILL)) == Decision(prefill=("b",))
    assert s.next_deadline() == 7.0


def test_a_prefilled_cache_fails_at_its_handoff_deadline():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    s.handle(WorkerDied(0.0, Worker.DECODE))
    s.handle(Arrival(0.0, "a", 4, 2))
    s.handle(prefilled(1.0, ("a", 1)))
    assert s.next_deadline() == 5.0
    assert s.handle(Tick(5.0)) == Decision(discard=("a",), failed=(
        failure("a", FailReason.DEADLINE, Stage.PREFILLED, 0.0, (1.0,), 5.0),))


def test_a_decoding_request_left_out_of_steps_fails_at_its_token_deadline():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    queue_then_prefill(s, 0.0, "ab", 9)
    s.handle(prefilled(1.0, ("a", 1), ("b", 2)))
    assert s.handle(HandoffDone(1.0, "a", 0)) == Decision(decode_step=True)
    s.handle(HandoffDone(1.0, "b", 1))
    assert s.handle(stepped(2.0, ("b", 1, 5))) == Decision(decode_step=True, tokens=(Token("b", 5),))
    assert s.next_deadline() == 3.0  # a's last token at 1 + 2
    assert s.handle(stepped(3.0, ("b", 1, 6))) == Decision(evict=(0,), decode_step=True, tokens=(Token("b", 6),),
                                                           failed=(failure("a", FailReason.DEADLINE, Stage.DECODING,
                                                                           0.0, (1.0,), 3.0),))


def test_the_token_deadline_follows_each_requests_last_token():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    queue_then_prefill(s, 0.0, "ab", 9)
    s.handle(prefilled(1.0, ("a", 1), ("b", 2)))
    s.handle(HandoffDone(1.0, "a", 0))  # a step is dispatched at once
    s.handle(HandoffDone(1.5, "b", 1))  # b joins after that step, and then the worker skips it
    s.handle(stepped(2.0, ("a", 0, 5)))
    s.handle(stepped(3.0, ("a", 0, 6)))
    assert s.next_deadline() == 3.5  # b's commit at 1.5 + 2, though a decoded first and since
    assert s.handle(Tick(3.5)) == Decision(evict=(1,), failed=(
        failure("b", FailReason.DEADLINE, Stage.DECODING, 0.0, (1.0,), 3.5),))


def test_a_hung_decode_step_restarts_the_decode_worker():
    s = Scheduler(SchedulerConfig(deadlines=SHORT))
    s.handle(Arrival(0.0, "a", 4, 9))
    s.handle(prefilled(1.0, ("a", 1)))
    s.handle(HandoffDone(1.5, "a", 0))  # step dispatched at 1.5
    assert s.handle(Tick(3.5)) == Decision(restart=(Worker.DECODE,), failed=(
        failure("a", FailReason.DEADLINE, Stage.DECODING, 0.0, (1.0,), 3.5),))
    assert s.slot_holders() == {}


# Integrated mode.

def test_integrated_runs_one_unit_at_a_time_prefill_first():
    s = Scheduler(SchedulerConfig(mode=INT, slots=2))
    assert s.handle(Arrival(0.0, "a", 10, 3)) == Decision(placements=(Placement("a", 0),), prefill=("a",))
    assert s.handle(Arrival(0.5, "b", 10, 3)) == Decision()
    assert s.handle(prefilled(1.0, ("a", 1))) == Decision(placements=(Placement("b", 1),), prefill=("b",),
                                                          tokens=(Token("a", 1),))
    assert s.handle(prefilled(2.0, ("b", 2))) == Decision(decode_step=True, tokens=(Token("b", 2),))
    assert s.handle(Arrival(2.5, "c", 10, 3)) == Decision()  # no free slot: c waits
    assert s.handle(stepped(3.0, ("a", 0, 3), ("b", 1, 4))) == Decision(decode_step=True,
                                                                       tokens=(Token("a", 3), Token("b", 4)))
    assert s.handle(stepped(4.0, ("a", 0, 5), ("b", 1, 6, FinishReason.EOS))) == Decision(
        evict=(0, 1), placements=(Placement("c", 0),), prefill=("c",), tokens=(Token("a", 5), Token("b", 6)),
        finished=(Finished("a", FinishReason.LENGTH, times(0.0, (1.0, 3.0, 4.0), 4.0)),
                  Finished("b", FinishReason.EOS, times(0.5, (2.0, 3.0, 4.0), 4.0))))


def test_integrated_prefill_batch_is_bounded_by_free_slots():
    s = Scheduler(SchedulerConfig(mode=INT, slots=2))
    s.handle(WorkerDied(0.0, Worker.DECODE))
    for rid in "abc":
        s.handle(Arrival(0.0, rid, 4, 3))
    assert s.handle(WorkerReady(1.0, Worker.PREFILL)) == Decision(
        placements=(Placement("a", 0), Placement("b", 1)), prefill=("a", "b"))


def test_integrated_first_token_can_finish_a_request():
    s = Scheduler(SchedulerConfig(mode=INT, slots=1))
    s.handle(Arrival(0.0, "a", 4, 8))
    assert s.handle(prefilled(1.0, PrefillOutcome("a", 7, FinishReason.STOP))) == Decision(
        evict=(0,), tokens=(Token("a", 7),), finished=(Finished("a", FinishReason.STOP, times(0.0, (1.0,), 1.0)),))


def test_integrated_worker_death_fails_everything_but_the_queue():
    s = Scheduler(SchedulerConfig(mode=INT, slots=2, max_prefill_batch=1))
    for rid in "abc":
        s.handle(Arrival(0.0, rid, 4, 5))
    s.handle(prefilled(1.0, ("a", 1)))  # b prefills into slot 1 before a decodes
    assert s.handle(WorkerDied(2.0, Worker.DECODE)) == Decision(failed=(
        failure("b", FailReason.WORKER_DIED, Stage.PREFILLING, 0.0, (), 2.0),
        failure("a", FailReason.WORKER_DIED, Stage.DECODING, 0.0, (1.0,), 2.0)))
    assert s.slot_holders() == {} and s.waiting_ids() == ("c",)
    assert s.handle(WorkerReady(3.0, Worker.PREFILL)) == Decision(placements=(Placement("c", 0),), prefill=("c",))


# Misuse.

def test_stale_and_bad_events():
    s = Scheduler(SchedulerConfig())
    assert s.handle(stepped(1.0, ("a", 0, 1))) == Decision()  # no step in flight
    s.handle(Arrival(1.0, "a", 4, 2))
    with pytest.raises(ValueError, match="already live"):
        s.handle(Arrival(1.0, "a", 4, 2))
    with pytest.raises(ValueError, match="at least 1"):
        s.handle(Arrival(1.0, "b", 0, 2))
    with pytest.raises(ValueError, match="earlier"):
        s.handle(Tick(0.5))


@pytest.mark.parametrize("make", [lambda: SchedulerConfig(slots=0), lambda: SchedulerConfig(max_waiting=0),
                                  lambda: SchedulerConfig(retry_after_s=-1.0), lambda: Deadlines(token_s=0.0)],
                         ids=["no slots", "no queue", "negative retry", "zero deadline"])
def test_bad_configs_are_refused(make):
    with pytest.raises(ValueError, match="must be"):
        make()


# Random event sequences, as workers that behave (tokens only for what they were asked to run),
# fail, hang, lose clients and send stale messages, with the invariants checked after every event.

class World:
    """Fake workers and clients around a scheduler, and the checks of its invariants."""

    def __init__(self, config: SchedulerConfig, twin: bool = False):
        self.config, self.s = config, Scheduler(config)
        # A second scheduler given each event through its plain-value entry point (the simulator's).
        self.twin = Scheduler(config) if twin else None
        self.now, self.arrived, self.max_new = 0.0, [], {}
        self.ended = collections.Counter()
        self.prefill_order: list[str] = []
        self.batch: list[str] | None = None  # the prefill worker's batch
        self.transfers: dict[str, int] = {}  # the decode worker's streams, request -> slot
        self.step: list[tuple[str, int]] | None = None  # the decode worker's step, (request, slot)
        self.down: set[Worker] = set()
        self.tokens = collections.Counter()

    def draw_event(self, data):
        kinds = ["arrival", "arrival", "tick", "disconnect", "die"] + ["ready"] * bool(self.down)
        kinds += ["prefill"] * 3 * (self.batch is not None) + ["handoff"] * 3 * bool(self.transfers)
        kinds += ["step"] * 3 * (self.step is not None)
        kind = data.draw(st.sampled_from(kinds))
        t = self.now + data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.5]))
        if kind == "arrival":
            rid = f"r{len(self.arrived)}"
            return Arrival(t, rid, data.draw(st.integers(1, 30)), data.draw(st.integers(1, 4)))
        if kind == "tick":
            return Tick(t + data.draw(st.sampled_from([0.0, 3.0, 6.0])))
        if kind == "disconnect":
            return Disconnect(t, data.draw(st.sampled_from(self.arrived))) if self.arrived else Tick(t)
        if kind == "die":
            return WorkerDied(t, data.draw(st.sampled_from(Worker)))
        if kind == "ready":
            return WorkerReady(t, data.draw(st.sampled_from(sorted(self.down, key=lambda w: w.value))))
        if kind == "prefill":
            outcome = st.sampled_from([None, "token", "token", "token", FinishReason.EOS])
            outcomes = [(rid, data.draw(outcome)) for rid in self.batch]
            keep = data.draw(st.integers(max(0, len(outcomes) - 1), len(outcomes)))  # maybe one missing
            return PrefillDone(t, tuple(PrefillOutcome(rid, None if o is None else 1,
                                                       o if isinstance(o, FinishReason) else None)
                                        for rid, o in outcomes[:keep]))
        if kind == "handoff":
            rid = data.draw(st.sampled_from(sorted(self.transfers)))
            if data.draw(st.booleans()):
                return HandoffDone(t, rid, self.transfers[rid])
            return HandoffFailed(t, rid, "refused")
        finish = st.sampled_from([None, None, None, FinishReason.EOS, FinishReason.STOP])
        return StepDone(t, tuple(SlotToken(rid, slot, 2, data.draw(finish)) for rid, slot in self.step))

    def send(self, event) -> Decision:
        self.now = event.time
        if isinstance(event, Arrival):
            self.arrived.append(event.request_id)
            self.max_new[event.request_id] = event.max_new_tokens
        elif isinstance(event, PrefillDone):
            self.batch = None
        elif isinstance(event, (HandoffDone, HandoffFailed)):
            del self.transfers[event.request_id]
        elif isinstance(event, StepDone):
            self.step = None
        elif isinstance(event, WorkerDied):
            self.lose(event.worker)
        elif isinstance(event, WorkerReady):
            self.down -= self.same_process(event.worker)
        decision = self.s.handle(event)
        if self.twin is not None:
            assert send_plain(self.twin, event).freeze() == decision, event
        self.apply(decision)
        self.check(decision)
        return decision

    def same_process(self, worker: Worker) -> set[Worker]:
        return set(Worker) if self.config.mode is INT else {worker}

    def lose(self, worker: Worker) -> None:
        """A dead or killed worker sends nothing more."""
        for w in self.same_process(worker):
            self.down.add(w)
            if w is Worker.PREFILL:
                self.batch = None
            else:
                self.transfers, self.step = {}, None

    def apply(self, d: Decision) -> None:
        for w in d.restart:
            self.lose(w)
        if self.config.mode is DIS:
            self.transfers.update({p.request_id: p.slot for p in d.placements})
        if d.prefill:
            assert self.batch is None, "a second prefill batch while one is in flight"
            self.batch = list(d.prefill)
            self.prefill_order += d.prefill
        if d.decode_step:
            assert self.step is None, "a second decode step while one is in flight"
            holders = self.s.slot_holders()
            self.step = [(rid, slot) for slot, rid in holders.items() if self.s.stage_of(rid) is Stage.DECODING]
            assert self.step, "a decode step with nothing to decode"
        if self.config.mode is INT:
            assert self.batch is None or self.step is None, "integrated: prefill and decode at once"

    def check(self, d: Decision) -> None:
        s, cfg = self.s, self.config
        for t in d.tokens:
            self.tokens[t.request_id] += 1
            assert self.tokens[t.request_id] <= self.max_new[t.request_id]
        for f in d.finished:
            if f.reason is FinishReason.LENGTH:
                assert self.tokens[f.request_id] == self.max_new[f.request_id]
            assert f.times.output_tokens == self.tokens[f.request_id]
        assert all(self.tokens[rid] < self.max_new[rid] for rid in self.s.live_ids()), "a request past its limit"
        self.ended.update([f.request_id for f in d.finished] + [f.request_id for f in d.failed])
        # Every request ends exactly once, and until then the scheduler knows where it is.
        assert max(self.ended.values(), default=1) == 1, self.ended.most_common(1)
        for rid in self.arrived:
            assert (s.stage_of(rid) is None) == (rid in self.ended), rid
        # A slot has at most one holder; slot holders are exactly the requests at a slot stage.
        holders = s.slot_holders()
        assert len(set(holders.values())) == len(holders)
        slot_stages = {Stage.TRANSFERRING, Stage.DECODING} | ({Stage.PREFILLING} if cfg.mode is INT else set())
        assert set(holders.values()) == {rid for rid in s.live_ids() if s.stage_of(rid) in slot_stages}
        assert all(holders.get(p.slot) == p.request_id for p in d.placements)
        if Worker.DECODE in self.down:
            assert not holders, "slots outlive the decode worker"
        # Bounded queues; batches within their bounds; FCFS admission.
        assert len(s.waiting_ids()) <= cfg.max_waiting
        if cfg.mode is DIS:
            prefilling = [rid for rid in s.live_ids() if s.stage_of(rid) is Stage.PREFILLING]
            assert len(s.handoff_ids()) + len(prefilling) <= cfg.max_prefilled
        assert len(d.prefill) <= cfg.max_prefill_batch
        order = {rid: i for i, rid in enumerate(self.arrived)}
        assert [order[r] for r in self.prefill_order] == sorted(order[r] for r in self.prefill_order)
        # Work conserving: an idle worker that could work was given work.
        decoding = any(s.stage_of(rid) is Stage.DECODING for rid in holders.values())
        free = len(holders) < cfg.slots
        if cfg.mode is DIS:
            if Worker.PREFILL not in self.down and self.batch is None:
                assert not s.waiting_ids() or len(s.handoff_ids()) == cfg.max_prefilled, "prefill worker idle"
            if Worker.DECODE not in self.down:
                assert not (free and s.handoff_ids()), "a free slot while caches wait"
                assert self.step is not None or not decoding, "decode worker idle"
        elif not self.down and self.batch is None and self.step is None:
            assert not (free and s.waiting_ids()) and not decoding, "integrated worker idle"
        # Nothing live is past its deadline.
        deadline = s.next_deadline()
        assert deadline is None or deadline > self.now

    def drain(self) -> None:
        """Lose both workers and let every deadline pass: everything ends."""
        for w in Worker:
            self.send(WorkerDied(self.now, w))
        self.send(Tick(self.now + 100.0))
        assert is_idle(self.s)
        assert set(self.ended) == set(self.arrived)


def send_plain(s: Scheduler, e):
    """`e` through the scheduler's entry point for its kind, as plain values."""
    if isinstance(e, Arrival):
        return s.arrive(e.time, e.request_id, e.prompt_len, e.max_new_tokens)
    if isinstance(e, PrefillDone):
        return s.prefill_done(e.time, [(o.request_id, o.token, o.finish) for o in e.outcomes])
    if isinstance(e, HandoffDone):
        return s.handoff_done(e.time, e.request_id, e.slot)
    if isinstance(e, HandoffFailed):
        return s.handoff_failed(e.time, e.request_id, e.detail)
    if isinstance(e, StepDone):
        return s.step_done(e.time, [(t.request_id, t.slot, t.token, t.finish) for t in e.tokens], e.steps, e.last_start)
    if isinstance(e, Disconnect):
        return s.disconnect(e.time, e.request_id)
    if isinstance(e, WorkerDied):
        return s.worker_died(e.time, e.worker)
    if isinstance(e, WorkerReady):
        return s.worker_ready(e.time, e.worker)
    assert isinstance(e, Tick), e
    return s.tick(e.time)


def is_idle(s: Scheduler) -> bool:
    return s.live_ids() == () and s.slot_holders() == {} and s.next_deadline() is None


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(Mode), data=st.data())
def test_invariants_hold_under_random_events(mode, data):
    config = SchedulerConfig(
        mode=mode, slots=data.draw(st.integers(1, 3)), max_waiting=data.draw(st.integers(1, 4)),
        max_prefill_batch=data.draw(st.integers(1, 3)), max_prefill_tokens=data.draw(st.integers(1, 40)),
        max_prefilled=data.draw(st.integers(1, 3)), deadlines=SHORT)
    world = World(config)
    for _ in range(data.draw(st.integers(1, 60))):
        world.send(world.draw_event(data))
    world.drain()


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(Mode), data=st.data())
def test_the_plain_value_entry_points_decide_as_handle_does(mode, data):
    """The simulator's way in (an entry point per event kind, its decision read before the next
    event) against `handle` on the same random events: equal decisions, event by event."""
    config = SchedulerConfig(mode=mode, slots=data.draw(st.integers(1, 3)), max_waiting=data.draw(st.integers(1, 4)),
                             max_prefill_batch=data.draw(st.integers(1, 3)), max_prefilled=2, deadlines=SHORT)
    world = World(config, twin=True)
    for _ in range(data.draw(st.integers(1, 60))):
        world.send(world.draw_event(data))
    world.drain()


def _decoding_pair(stream=False):
    """Requests a (6 tokens) and b (9 tokens) decoding in slots 0 and 1 from time 1.0, counted."""
    s = Scheduler(SchedulerConfig(mode=INT, slots=2, deadlines=SHORT), stream=stream)
    s.handle(WorkerDied(0.0, Worker.PREFILL))  # so that both arrivals make one prefill batch
    s.handle(Arrival(0.0, "a", 4, 6))
    s.handle(Arrival(0.0, "b", 4, 9))
    assert s.handle(WorkerReady(0.0, Worker.PREFILL)).prefill == ("a", "b")
    assert s.handle(prefilled(1.0, ("a", 7), ("b", 8))).decode_step  # the first step starts at 1.0
    return s


def test_a_step_done_of_several_steps_equals_them_one_by_one():
    """Four steps as one StepDone (last dispatched at 4.0, ended at 5.0) leave the scheduler as
    four StepDones would; then single steps finish both requests with the same times."""
    tokens = (SlotToken("a", 0, 0), SlotToken("b", 1, 0))
    one, bulk = _decoding_pair(), _decoding_pair()
    for t in (2.0, 3.0, 4.0, 5.0):
        last = one.handle(StepDone(t, tokens))
    assert bulk.handle(StepDone(5.0, tokens, steps=4, last_start=4.0)) == last
    assert bulk.next_deadline() == one.next_deadline() == 5.0 + SHORT.token_s
    ended = []
    for s in (one, bulk):
        ds = [s.handle(StepDone(t, tokens)) for t in (6.0, 7.0, 8.0, 9.0)]
        ended.append([f for d in ds for f in d.finished])
    assert ended[0] == ended[1]
    a, b = ended[0]
    assert (a.request_id, a.times.output_tokens, a.times.finish) == ("a", 6, 6.0)
    assert (b.request_id, b.times.output_tokens, b.times.first_token, b.times.finish) == ("b", 9, 1.0, 9.0)
    assert b.times.token_times == () and tpot(b.times) == 1.0 and ttft(b.times) == 1.0


def test_a_step_done_of_several_steps_is_refused_where_it_cannot_hold():
    tokens = (SlotToken("a", 0, 0), SlotToken("b", 1, 0))
    with pytest.raises(ValueError, match="counts tokens"):
        _decoding_pair(stream=True).handle(StepDone(3.0, tokens, steps=2, last_start=2.0))
    with pytest.raises(ValueError, match="last step's start"):
        _decoding_pair().handle(StepDone(3.0, tokens, steps=2))
    with pytest.raises(ValueError, match="past its 6 tokens"):  # a would end at the end of its 5th step
        _decoding_pair().handle(StepDone(7.0, tokens, steps=6, last_start=6.0))


def test_counted_request_times():
    t = RequestTimes(1.0, (), 4.0, output_tokens=4, first_token=1.5)
    assert (ttft(t), tpot(t), e2e_latency(t)) == (0.5, 2.5 / 3, 3.0)
    with pytest.raises(ValueError, match="every token's time"):
        itl(t)
    assert times(1.0, (1.5, 2.0), 2.0).first_token == 1.5
    with pytest.raises(ValueError, match="token times"):
        RequestTimes(1.0, (1.5,), 2.0, output_tokens=2)
    with pytest.raises(ValueError, match="first token"):
        RequestTimes(1.0, (), 2.0, output_tokens=2)
