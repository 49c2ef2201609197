"""The serving scheduler: pure policy over events, one object for the live server and the simulator.

`Scheduler.handle(event)` updates the state and returns a `Decision` (serve/events.py). It never
sleeps, reads a clock or touches a socket: time arrives in each event. Each event is handled in
three steps: deadlines that `event.time` has reached fail their requests; the event itself is
applied; then new work is scheduled. A driver that sends millions of events (the simulator) calls
the entry point of each kind with plain values instead (`arrive`, `prefill_done`, `step_done`,
...) and reads the decision as the scheduler built it (`Pending`); `handle` is those entry points
plus the conversions, so both ways in run the same policy.

Life of a request (disaggregated): WAITING (FCFS queue, bounded) -> PREFILLING (one batch in
flight on the prefill worker) -> PREFILLED (handoff queue: the cache waits on the prefill side for
a free slot) -> TRANSFERRING (streaming into its reserved slot while the other slots decode) ->
DECODING (continuous batching: it joins at a step boundary and leaves on EOS, a stop string or its
token limit). Integrated: WAITING -> PREFILLING (its slot reserved; the one worker prefills between
decode steps and lands the cache in place) -> DECODING.

Every request ends exactly once, as a `Finished` or a `Failure`, and whatever it held (a queue
place, a slot, a cache on the prefill side) is released in the same decision. Work is tracked per
request id, so events that arrive after their request ended (a token from a step dispatched
before a disconnect, a handoff that completed after its deadline) are ignored.

Each stage keeps its requests in the order they entered it, which is also the order of their
deadlines, so deadlines are checked at the heads and an event costs O(1) per request it touches
(plus O(log slots) per slot): a simulation costs what its events and tokens cost, whatever the
length of the queues.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

from serve.events import (Arrival, Decision, Disconnect, Event, FailReason, Failure, Finished, FinishReason,
                          HandoffDone, HandoffFailed, Mode, Placement, PrefillDone, RequestId, SchedulerConfig, Stage,
                          StepDone, Tick, Token, Worker, WorkerDied, WorkerReady)
from serve.timings import RequestTimes


# The stages and workers as module constants: the scheduler reads several for each event, and
# reading an Enum member off its class costs a descriptor call (about 4x a global's lookup).
_WAITING, _PREFILLING, _PREFILLED = Stage.WAITING, Stage.PREFILLING, Stage.PREFILLED
_TRANSFERRING, _DECODING = Stage.TRANSFERRING, Stage.DECODING
_PREFILL, _DECODE = Worker.PREFILL, Worker.DECODE


@dataclasses.dataclass(slots=True)
class _Request:
    id: RequestId
    prompt_len: int
    max_new_tokens: int
    arrival: float
    stage: Stage = Stage.WAITING
    since: float = 0.0  # when it entered its stage; while decoding, its last token's time
    slot: int | None = None
    tokens: int = 0  # output tokens so far
    first_token: float | None = None
    token_times: list[float] | None = None  # every token's time, when the scheduler streams

    def times(self, finish: float) -> RequestTimes:
        if self.token_times is not None:
            return RequestTimes(self.arrival, tuple(self.token_times), finish)
        return RequestTimes(self.arrival, (), finish, self.tokens, self.first_token)


assert tuple(f.name for f in dataclasses.fields(Decision)) == (
    "restart", "evict", "discard", "placements", "prefill", "decode_step", "tokens", "finished", "failed")


class Pending:
    """The decision of the last event as the scheduler builds it: `Decision`'s fields as lists of
    plain values, for a driver that reads it before its next event (the simulator, through the
    entry points that take plain values); `handle` returns it frozen, as a `Decision`.

    `placements` holds (request id, slot) pairs and `finished` (request, reason, finish time)
    triples (the request's `RequestTimes` and the `Placement`s and `Finished`s are made only by
    `freeze`); the other fields hold what `Decision`'s do. The next event empties it by giving it
    new lists, never by clearing these, so a driver may keep a list it was given.
    """

    __slots__ = ("restart", "evict", "discard", "placements", "prefill", "decode_step", "tokens", "finished", "failed")

    def __init__(self):
        self.restart, self.evict, self.discard, self.placements, self.prefill = [], [], [], [], []
        self.decode_step = False
        self.tokens, self.finished, self.failed = [], [], []

    def freeze(self) -> Decision:
        if not (self.restart or self.evict or self.discard or self.placements or self.prefill or self.tokens
                or self.finished or self.failed):
            return _STEP if self.decode_step else _NOTHING  # the common decisions, shared (they are frozen)
        # The Decision without its dataclass __init__, which sets each of the nine fields through
        # object.__setattr__ (it is frozen). The result is the same frozen object (tests compare
        # decisions with Decision(...) ones).
        d = _new_object(Decision)
        _set_attribute(d, "__dict__", {
            "restart": tuple(self.restart), "evict": tuple(self.evict), "discard": tuple(self.discard),
            "placements": tuple(Placement(rid, slot) for rid, slot in self.placements),
            "prefill": tuple(self.prefill), "decode_step": self.decode_step, "tokens": tuple(self.tokens),
            "finished": tuple(Finished(r.id, reason, r.times(finish)) for r, reason, finish in self.finished),
            "failed": tuple(self.failed)})
        return d


_NOTHING, _STEP = Decision(), Decision(decode_step=True)
_new_object, _set_attribute = object.__new__, object.__setattr__


class Scheduler:
    """Admission, prefill batching, slot assignment, the handoff queue and continuous batching.

    With `stream` (the live server) every output token is a `Token` in its decision and every
    token's time is kept for `RequestTimes`; without it (the simulator) tokens are only counted,
    with the first one's time, and a `StepDone` may stand for several steps. The policy is the
    same either way: only what is recorded about tokens differs.
    """

    def __init__(self, config: SchedulerConfig, stream: bool = True):
        self.config = config
        self.stream = stream
        self.now = float("-inf")
        self._requests: dict[RequestId, _Request] = {}  # live requests only
        # The live requests of each stage, in the order they entered it (so by deadline). The
        # PREFILLING ones are the members of the one prefill batch in flight.
        self._in: dict[Stage, collections.OrderedDict[RequestId, None]] = {
            stage: collections.OrderedDict() for stage in Stage}
        self._slots: list[RequestId | None] = [None] * config.slots
        self._free = list(range(config.slots))  # a heap: the lowest free slot is taken first
        self._batch_start: float | None = None  # the prefill batch in flight, even if all its requests ended
        self._step_start: float | None = None  # the decode step in flight
        self._up = {_PREFILL: True, _DECODE: True}
        self._out = Pending()  # the decision being built (see `handle`)
        d = config.deadlines
        self._limits = ((_WAITING, d.queue_s), (_PREFILLED, d.handoff_s), (_TRANSFERRING, d.handoff_s),
                        (_DECODING, d.token_s))
        # No deadline passes before this time, so `handle` skips `_expire` until then (see there).
        self._quiet_until = float("-inf")
        self._shortest = min(getattr(d, f.name) for f in dataclasses.fields(d))
        self.integrated = config.mode is Mode.INTEGRATED  # the config is frozen: fixed for good
        self._schedule = self._schedule_integrated if self.integrated else self._schedule_disaggregated

    # Views for drivers (metrics) and tests.

    def stage_of(self, request_id: RequestId) -> Stage | None:
        """The stage of a live request; None once it has ended (or if it never arrived)."""
        r = self._requests.get(request_id)
        return r.stage if r else None

    def waiting_ids(self) -> tuple[RequestId, ...]:
        return tuple(self._in[_WAITING])

    def handoff_ids(self) -> tuple[RequestId, ...]:
        """Prefilled requests waiting for a slot, oldest first."""
        return tuple(self._in[_PREFILLED])

    def slot_holders(self) -> dict[int, RequestId]:
        """Held slots (reserved or committed) and their requests."""
        return {s: rid for s, rid in enumerate(self._slots) if rid is not None}

    def live_ids(self) -> tuple[RequestId, ...]:
        return tuple(self._requests)

    def next_deadline(self) -> float | None:
        """The earliest time at which a deadline fails something, if nothing else happens first."""
        d = self.config.deadlines
        times = [start + limit for start, limit in ((self._batch_start, d.prefill_s), (self._step_start, d.token_s))
                 if start is not None]
        times += [self._requests[next(iter(self._in[stage]))].since + limit
                  for stage, limit in self._stage_limits() if self._in[stage]]
        return min(times, default=None)

    def _stage_limits(self) -> tuple[tuple[Stage, float], ...]:
        """Each stage's deadline but PREFILLING's, which is its batch's (a hung prefill worker)."""
        return self._limits

    # Events. `handle` takes an event object and returns a frozen `Decision`; the entry points
    # after it take each kind of event as plain values and return the `Pending` decision (the
    # simulator's way in: it sends millions of events and reads each decision once). `handle` is
    # those entry points and nothing else: one policy, whichever way an event comes in.

    def handle(self, event: Event) -> Decision:
        """Apply one event; returns what to do now."""
        apply = _APPLY.get(type(event)) or next((f for t, f in _APPLY.items() if isinstance(event, t)), None)
        if apply is None:
            raise TypeError(f"not a scheduler event: {event!r}")
        return apply(self, event).freeze()

    def _begin(self, time: float) -> Pending:
        """Every event starts here: the clock moves to `time` and the deadlines it reached fail."""
        if time < self.now:
            raise ValueError(f"event at {time} is earlier than the last one, at {self.now}")
        self.now = time
        out = self._out
        # Empty the decision: one `Pending` serves every event, and most leave it empty (new lists,
        # never cleared ones: see Pending).
        if out.restart or out.evict or out.discard or out.placements:
            out.restart, out.evict, out.discard, out.placements = [], [], [], []
        if out.prefill or out.tokens or out.finished or out.failed:
            out.prefill, out.tokens, out.finished, out.failed = [], [], [], []
        out.decode_step = False
        if time >= self._quiet_until:
            self._expire(out)
        return out

    def arrive(self, time: float, request_id: RequestId, prompt_len: int, max_new_tokens: int) -> Pending:
        """An `Arrival`."""
        out = self._begin(time)
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already live")
        if prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: prompt of {prompt_len} tokens, "
                             f"{max_new_tokens} new tokens; each must be at least 1")
        waiting = self._in[_WAITING]
        if len(waiting) >= self.config.max_waiting:
            out.failed.append(Failure(request_id, FailReason.QUEUE_FULL, None, RequestTimes(time, (), time),
                                      retry_after_s=self.config.retry_after_s))
        else:
            self._requests[request_id] = _Request(request_id, prompt_len, max_new_tokens, time, since=time,
                                                  token_times=[] if self.stream else None)
            waiting[request_id] = None
        self._schedule(out)
        return out

    def prefill_done(self, time: float, outcomes: collections.abc.Iterable[tuple[RequestId, int | None, FinishReason | None]]
                     ) -> Pending:
        """A `PrefillDone`; its outcomes as (request id, token, finish) triples."""
        out = self._begin(time)
        if self._batch_start is not None:  # else from a worker already declared dead or hung
            self._batch_start = None
            self._prefill_outcomes(outcomes, out)
        self._schedule(out)
        return out

    def _prefill_outcomes(self, outcomes, out: Pending) -> None:
        members = self._in[_PREFILLING]
        for rid, token, finish in outcomes:
            if rid not in members:
                # Its request ended while it was prefilled: the cache it made is not wanted.
                if rid not in self._requests and not self.integrated and token is not None:
                    out.discard.append(rid)
                continue
            r = self._requests[rid]
            if token is None:
                self._fail(r, FailReason.PREFILL_FAILED, out)
            elif self._emit(r, token, finish, out):
                if not self.integrated:
                    out.discard.append(r.id)
            else:
                self._move(r, _DECODING if self.integrated else _PREFILLED)
        for rid in list(members):  # the worker reported nothing for these
            self._fail(self._requests[rid], FailReason.PREFILL_FAILED, out, detail="no result from the prefill batch")
            if not self.integrated:
                out.discard.append(rid)

    def handoff_done(self, time: float, request_id: RequestId, slot: int) -> Pending:
        """A `HandoffDone`."""
        out = self._begin(time)
        r = self._requests.get(request_id)
        if r and r.stage is _TRANSFERRING and r.slot == slot:
            self._move(r, _DECODING)
        self._schedule(out)
        return out

    def handoff_failed(self, time: float, request_id: RequestId, detail: str = "") -> Pending:
        """A `HandoffFailed`."""
        out = self._begin(time)
        r = self._requests.get(request_id)
        if r and r.stage is _TRANSFERRING:
            self._fail(r, FailReason.HANDOFF_REFUSED, out, detail=detail)
        self._schedule(out)
        return out

    def disconnect(self, time: float, request_id: RequestId) -> Pending:
        """A `Disconnect`."""
        out = self._begin(time)
        r = self._requests.get(request_id)
        if r:
            self._fail(r, FailReason.DISCONNECTED, out)
        self._schedule(out)
        return out

    def worker_died(self, time: float, worker: Worker) -> Pending:
        """A `WorkerDied`."""
        out = self._begin(time)
        self._lose_worker(worker, FailReason.WORKER_DIED, out)
        self._schedule(out)
        return out

    def worker_ready(self, time: float, worker: Worker) -> Pending:
        """A `WorkerReady`."""
        out = self._begin(time)
        for w in self._same_process(worker):
            self._up[w] = True
        self._schedule(out)
        return out

    def tick(self, time: float) -> Pending:
        """A `Tick`."""
        out = self._begin(time)
        self._schedule(out)
        return out

    def step_done(self, time: float, tokens: collections.abc.Sequence[tuple[RequestId, int, int, FinishReason | None]],
                  steps: int = 1, last_start: float | None = None) -> Pending:
        """A `StepDone`; its tokens as (request id, slot, token, finish) tuples."""
        if time < self.now:
            raise ValueError(f"event at {time} is earlier than the last one, at {self.now}")
        if steps != 1:
            self._steps_before_last(time, tokens, steps, last_start)
        out = self._begin(time)
        if self._step_start is not None:  # else from a worker already declared dead or hung
            self._step_start = None
            requests, decoding, now, counting = self._requests, self._in[_DECODING], self.now, not self.stream
            for rid, slot, token, finish in tokens:
                r = requests.get(rid)
                if r and r.stage is _DECODING and r.slot == slot:
                    if counting and finish is None and r.tokens + 1 < r.max_new_tokens:
                        # _emit's common case, inlined (a simulation makes this call per token)
                        r.tokens += 1
                        r.since = now
                        decoding.move_to_end(rid)
                    else:
                        self._emit(r, token, finish, out)
        self._schedule(out)
        return out

    def _steps_before_last(self, time: float, tokens, steps: int, last_start: float | None) -> None:
        """Of a `StepDone` of several steps, apply all but the last, as their own events would have
        (the driver guarantees that nothing else happened at their boundaries); `step_done` then
        applies the last step as a one-step event."""
        if self.stream:
            raise ValueError("a StepDone of several steps needs a scheduler that counts tokens (stream=False)")
        if steps < 1 or last_start is None or not self.now <= last_start <= time:
            raise ValueError(f"a StepDone of {steps} steps needs its last step's start between the last "
                             f"event ({self.now}) and its time ({time}), got {last_start}")
        if self._step_start is None:
            return  # from a worker already declared dead or hung: step_done drops the event
        self.now = self._step_start = last_start
        before = steps - 1
        decoding = self._in[_DECODING]
        for rid, slot, _, _ in tokens:
            r = self._requests.get(rid)
            if r and r.stage is _DECODING and r.slot == slot:
                if r.tokens + before >= r.max_new_tokens:
                    raise ValueError(f"a StepDone of {steps} steps runs request {r.id!r} past its "
                                     f"{r.max_new_tokens} tokens before its last step")
                r.tokens += before
                r.since = last_start
                decoding.move_to_end(rid)

    def _emit(self, r: _Request, token: int, finish: FinishReason | None, out: Pending) -> bool:
        """Record an output token; ends the request if it finishes it. Returns whether it did."""
        r.tokens += 1
        if r.first_token is None:
            r.first_token = self.now
        if r.token_times is not None:
            r.token_times.append(self.now)
            out.tokens.append(Token(r.id, token))
        if finish is None and r.tokens >= r.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            out.finished.append((r, finish, self.now))
            self._release(r, out)
            return True
        if r.stage is _DECODING:  # its token deadline restarts: it goes to the back
            r.since = self.now
            self._in[_DECODING].move_to_end(r.id)
        return False

    def _move(self, r: _Request, stage: Stage) -> None:
        del self._in[r.stage][r.id]
        r.stage, r.since = stage, self.now
        self._in[stage][r.id] = None

    # Ending requests.

    def _fail(self, r: _Request, reason: FailReason, out: Pending, detail: str = "",
              prefill_alive: bool = True, decode_alive: bool = True) -> None:
        out.failed.append(Failure(r.id, reason, r.stage, r.times(self.now), detail=detail))
        self._release(r, out, prefill_alive, decode_alive)

    def _release(self, r: _Request, out: Pending, prefill_alive: bool = True, decode_alive: bool = True) -> None:
        """Forget a request that ended, giving back what it holds to the workers still alive.

        A disaggregated PREFILLING request holds no cache yet: it is discarded when it arrives.
        """
        del self._requests[r.id]
        del self._in[r.stage][r.id]
        if r.stage in (_PREFILLED, _TRANSFERRING) and prefill_alive:
            out.discard.append(r.id)
        if r.slot is not None:
            self._slots[r.slot] = None
            heapq.heappush(self._free, r.slot)
            if decode_alive:
                out.evict.append(r.slot)

    def _same_process(self, worker: Worker) -> tuple[Worker, ...]:
        return (_PREFILL, _DECODE) if self.integrated else (worker,)

    def _lose_worker(self, worker: Worker, reason: FailReason, out: Pending) -> None:
        """Fail exactly the requests whose state lived in the lost worker, and mark it down."""
        lost = self._same_process(worker)
        # Disaggregated: the prefill worker holds the caches until they are committed on the decode
        # side; the decode worker holds its slots (reserved or committed).
        held = {_PREFILL: (_PREFILLING, _PREFILLED, _TRANSFERRING),
                _DECODE: (_TRANSFERRING, _DECODING)}
        doomed = {stage for w in lost for stage in held[w]}
        for stage in [stage for stage in Stage if stage in doomed]:
            for rid in list(self._in[stage]):
                self._fail(self._requests[rid], reason, out, prefill_alive=_PREFILL not in lost,
                           decode_alive=_DECODE not in lost)
        for w in lost:
            self._up[w] = False
        if _PREFILL in lost:
            self._batch_start = None
        if _DECODE in lost:
            self._step_start = None

    def _expire(self, out: Pending) -> None:
        """Fail whatever has reached its deadline at `self.now`, and note when the next one can
        pass: the earliest deadline left, or sooner, `now` + the shortest limit, as anything that
        starts a deadline from now on starts it at `now` or later (a request's `since` and a
        worker's start only move forward). Until then `handle` skips this check: it would fail
        nothing."""
        self._expire_due(out)
        deadline = self.next_deadline()
        soonest = self.now + self._shortest
        self._quiet_until = soonest if deadline is None or deadline > soonest else deadline

    def _expire_due(self, out: Pending) -> None:
        d, now = self.config.deadlines, self.now
        # A batch or a step past its deadline means a hung worker: what it holds is lost with it.
        if self._batch_start is not None and self._batch_start + d.prefill_s <= now:
            out.restart.append(_PREFILL)
            self._lose_worker(_PREFILL, FailReason.DEADLINE, out)
        if self._step_start is not None and self._step_start + d.token_s <= now:
            out.restart.append(_DECODE)
            self._lose_worker(_DECODE, FailReason.DEADLINE, out)
        for stage, limit in self._limits:
            queue = self._in[stage]
            while queue and self._requests[next(iter(queue))].since + limit <= now:
                self._fail(self._requests[next(iter(queue))], FailReason.DEADLINE, out)

    # Scheduling new work (`self._schedule` is the one of the config's mode).

    def _schedule_disaggregated(self, out: Pending) -> None:
        # Prefilled caches take free slots first come, first served.
        prefilled, up = self._in[_PREFILLED], self._up
        while prefilled and self._free and up[_DECODE]:
            self._place(self._requests[next(iter(prefilled))], _TRANSFERRING, out)
        # A batch only starts if the prefill side has room to hold all its caches until slots free up.
        if self._batch_start is None and self._in[_WAITING] and up[_PREFILL]:
            room = self.config.max_prefilled - len(prefilled)
            if room > 0:
                self._start_prefill(room, out)
        if self._step_start is None and self._in[_DECODING] and up[_DECODE]:
            out.decode_step, self._step_start = True, self.now

    def _schedule_integrated(self, out: Pending) -> None:
        # One unit of work at a time. A prefill goes first whenever a slot is free: new requests
        # join the batch as soon as possible (the interference disaggregation is meant to remove).
        if not self._up[_DECODE] or self._batch_start is not None or self._step_start is not None:
            return
        if self._free and self._in[_WAITING]:
            for rid in self._start_prefill(len(self._free), out):
                self._place(self._requests[rid], _PREFILLING, out)
        elif self._in[_DECODING]:
            out.decode_step, self._step_start = True, self.now

    def _place(self, r: _Request, stage: Stage, out: Pending) -> None:
        """Give `r` the lowest free slot as it enters `stage`."""
        r.slot = heapq.heappop(self._free)
        self._slots[r.slot] = r.id
        if r.stage is not stage:
            self._move(r, stage)
        out.placements.append((r.id, r.slot))

    def _start_prefill(self, most: int, out: Pending) -> list[RequestId]:
        """Take the head of the waiting queue, in order, as one batch of at most `most` prompts."""
        batch, tokens = [], 0
        most = min(most, self.config.max_prefill_batch)
        for rid in self._in[_WAITING]:
            prompt_len = self._requests[rid].prompt_len
            # Strict FCFS: stop at the first prompt that does not fit rather than skip it; a prompt
            # longer than the token budget runs alone, since the prefill chunks it anyway.
            if len(batch) == most or (batch and tokens + prompt_len > self.config.max_prefill_tokens):
                break
            batch.append(rid)
            tokens += prompt_len
        for rid in batch:
            self._move(self._requests[rid], _PREFILLING)
        if batch:
            self._batch_start = self.now
            out.prefill.extend(batch)
        return batch


# How `Scheduler.handle` applies each kind of event: through its entry point, as plain values.
_APPLY = {
    Arrival: lambda s, e: s.arrive(e.time, e.request_id, e.prompt_len, e.max_new_tokens),
    PrefillDone: lambda s, e: s.prefill_done(e.time, [(o.request_id, o.token, o.finish) for o in e.outcomes]),
    HandoffDone: lambda s, e: s.handoff_done(e.time, e.request_id, e.slot),
    HandoffFailed: lambda s, e: s.handoff_failed(e.time, e.request_id, e.detail),
    StepDone: lambda s, e: s.step_done(e.time, [(t.request_id, t.slot, t.token, t.finish) for t in e.tokens], e.steps,
                                       e.last_start),
    Disconnect: lambda s, e: s.disconnect(e.time, e.request_id),
    WorkerDied: lambda s, e: s.worker_died(e.time, e.worker),
    WorkerReady: lambda s, e: s.worker_ready(e.time, e.worker),
    Tick: lambda s, e: s.tick(e.time)}
