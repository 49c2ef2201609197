"""The fleet simulator: the serving scheduler (serve/scheduler.py) on a simulated clock.

Nothing of the policy is copied here. The simulator is a driver like the live engine: it sends the
scheduler events, each stamped with simulated time (through the scheduler's entry point for each
kind, as plain values: no event objects), and applies each decision (the scheduler's `Pending`)
in the documented order (restart, evict, discard, placements, prefill, decode_step), turning work
into future events whose times come from a cost source (serve/costs.py):

- a prefill batch ends `prefill_s(prompt lengths)` after it starts (`PrefillDone`, one first token
  per prompt);
- a placement (disaggregated) starts a KV transfer on the unit's link, which carries one cache at
  a time: it ends `handoff_s(prompt tokens)` after the link is free (`HandoffDone`); the slot
  joins the decode batch at the next step boundary. When the cost source ships caches from the
  prefill worker (`handoff_on_prefill`: the live server on this machine), a transfer also waits
  for the prefill batch in flight (the worker reads the ship command after it), but a prefill
  batch never waits for a transfer (the worker ships on a thread of its own); when its decode
  worker takes commands only between steps (`listens_between_steps`: the live server again), the
  listener a transfer streams into opens at the end of the decode step in flight (at once if none
  is), and only then is the transfer queued on the link or prefill worker, behind whatever was sent
  to it before (the prefill batch decided with the placement too); and a step decided while a
  cache is landing (its transfer started and not ended) starts when it has landed and takes it
  in, as the live decode worker places arriving caches in its loop before it steps (in the
  prefill-heavy validation runs, 15 and 17 pairs of requests ended in the same step, which the
  simulator gave 2 before this rule and 16 and 17 after);
- a decode step over the committed slots ends `decode_step_s(batch, context positions)` later and
  gives every slot one token (`StepDone`: one event for the whole batch); a request ends when the
  scheduler sees its output length (`max_new_tokens` = the workload's output length). Steps over
  the same slots that nothing else interrupts go to the scheduler as one `StepDone` of several
  steps (see `_catch_up`), and its scheduler counts tokens rather than streaming them, so a
  simulation costs what its requests' events cost, not what their tokens cost; the report is
  the one a step per event gives (`bulk_steps=False`, tests/test_simulator.py);
- a `Tick` goes in at `Scheduler.next_deadline()` when nothing else would reach the unit first;
- a restart drops the worker's work in flight, then sends `WorkerDied` at once and `WorkerReady`
  `restart_s` later; `discard` needs nothing (the prefill side's cache memory is not modelled
  beyond the scheduler's own `max_prefilled` bound).

A fleet is `units` copies of one (prefill worker, decode worker) pair, or of one integrated
worker, each with its own `Scheduler`: the scheduler owns one worker of each kind, and extending
it to pools would change the policy the live server runs. A router in front sends each arrival to
the unit with the fewest live requests (ties to the lowest index; `Router.ROUND_ROBIN` is the
alternative), like a least-outstanding-requests load balancer. Pools that do not divide into
pairs are shared by fluid shares: N prefill accelerators behind M decode replicas give each unit
N/M accelerators of prefill speed (exact when a unit's share is a whole group; a time share
otherwise, which keeps throughput and slightly understates queueing).

Validation against the live server (issue 14; built once the engine lands): the engine's workers
time their prefill batches, decode steps (with batch and context) and handoffs; `fit_measured`
(serve/costs.py) fits them into a `MeasuredCost` file; `wafer simulate --measured FILE --mode M`
then runs the same workload (`serve.workload.synthetic` with the same seed, which the load
generator should draw its arrivals and lengths from, or the same trace) through the same
scheduler config, and the two reports are compared percentile by percentile.

A round-robin fleet's units never interact, so `simulate_parallel` runs them in several
processes with the serial result.

Memory is bounded by the live requests: latencies go into streaming histograms
(serve/streamstats.py); per-request records are kept only when asked (tests, validation).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import gc
import heapq
import itertools
import multiprocessing
from typing import Callable

import numpy as np

from serve.costs import CostSource
from serve.events import FailReason, Mode, SchedulerConfig, Worker
from serve.scheduler import Pending, Scheduler
from serve.streamstats import LogHistogram
from serve.workload import Workload

TOO_LONG = "too_long"  # the failure count of requests refused for their length
_CHUNK = 1 << 16  # arrivals converted from numpy to Python at a time
_DURATIONS_KEPT = 4096  # plans' step times remembered
_PRICES_KEPT = 1 << 16  # prefill batches' and handoffs' times remembered
_COLLECT_EVERY = 50_000  # allocations between collections of the youngest generation (see _rare_collections)
_HORIZON_MIN, _HORIZON_MAX = 8, 1 << 14  # steps a plan covers (see _Unit.horizon)

# Event kinds on the heap, in the order ties at one instant are broken by (then by push order).
# A listener opening (_LISTEN) comes after a step's end at the same instant: it opens at that boundary.
_PREFILL_DONE, _HANDOFF_DONE, _STEP_DONE, _LISTEN, _CONTROL, _TICK = range(6)


class Router(enum.Enum):
    LEAST_LOADED = "least-loaded"  # the unit with the fewest live requests
    ROUND_ROBIN = "round-robin"  # arrival k to unit k mod units, whatever their state


@dataclasses.dataclass(frozen=True)
class Fleet:
    """`units` identical copies of one worker pair (or one integrated worker), each with its own
    scheduler of `config`, priced by `cost`."""

    config: SchedulerConfig
    cost: CostSource
    units: int = 1
    router: Router = Router.LEAST_LOADED
    restart_s: float = 10.0  # a hung worker's restart, until its WorkerReady
    # A request whose prompt and output exceed this many positions is refused before the scheduler
    # sees it, as the live front end answers 400 (counted as failed "too_long"); None: no limit.
    max_context: int | None = None

    def __post_init__(self):
        if self.units < 1:
            raise ValueError(f"a fleet needs at least one unit, got {self.units}")


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    fast_tokens_per_s: float = 20.0  # per-user speed a token must be served at to count as fast


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One ended request, kept only when the simulation is asked to (tests, validation)."""

    request_id: str
    unit: int  # -1 for a request refused before routing (too long)
    arrival: float
    ttft: float | None  # None for a failed request
    tpot: float | None
    e2e: float
    output_tokens: int
    failed: FailReason | None = None


@dataclasses.dataclass
class SimResult:
    requests: int = 0
    finished: int = 0
    good: int = 0  # finished within both SLOs (vLLM's goodput: TPOT of a one-token request counts as 0)
    output_tokens: int = 0
    fast_tokens: int = 0  # output tokens of requests served at or above the SLO's per-user speed
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    first_arrival: float = 0.0
    last_end: float = 0.0  # when the last request ended (a trailing deadline tick does not count)
    units: int = 1
    mode: str = ""
    prefill_busy_s: float = 0.0
    decode_busy_s: float = 0.0  # the steps' own times, as the cost source prices them
    # The steps that ended, from start to end: with workers that slow each other down
    # (`decode_slowdown`), a step that overlaps a prefill takes longer than its price; this is what
    # the live server's histogram of step times measures (bench/sim_validation.py compares them).
    decode_wall_s: float = 0.0
    decode_steps_ended: int = 0
    link_busy_s: float = 0.0
    prefill_batches: int = 0
    decode_steps: int = 0
    decode_batch_sum: int = 0
    events: int = 0
    ttft: LogHistogram = dataclasses.field(default_factory=LogHistogram)
    tpot: LogHistogram = dataclasses.field(default_factory=LogHistogram)
    e2e: LogHistogram = dataclasses.field(default_factory=LogHistogram)
    records: list[RequestRecord] | None = None

    @property
    def duration_s(self) -> float:
        return max(self.last_end - self.first_arrival, 1e-12)

    def summary(self) -> dict:
        d, u = self.duration_s, self.units
        return {
            "mode": self.mode, "units": u, "requests": self.requests, "finished": self.finished,
            "failed": dict(self.failed), "duration_s": d, "events": self.events,
            "throughput_req_s": self.finished / d, "output_tokens_s": self.output_tokens / d,
            "goodput_req_s": self.good / d, "slo_attainment": self.good / max(1, self.requests),
            "fast_tokens_s": self.fast_tokens / d,
            "ttft_s": self.ttft.summary(), "tpot_s": self.tpot.summary(), "e2e_s": self.e2e.summary(),
            "utilisation": {"prefill": self.prefill_busy_s / (u * d), "decode": self.decode_busy_s / (u * d),
                            "link": self.link_busy_s / (u * d)},
            "mean_decode_batch": self.decode_batch_sum / max(1, self.decode_steps),
            "prefill_batches": self.prefill_batches, "decode_steps": self.decode_steps,
        }


def merge(results: list[SimResult]) -> SimResult:
    """One result for the units of several simulations run side by side (their times share a clock)."""
    out = SimResult(mode=results[0].mode, units=0, first_arrival=min(r.first_arrival for r in results),
                    records=None if any(r.records is None for r in results) else [])
    for r in results:
        for name in ("requests", "finished", "good", "output_tokens", "fast_tokens", "units", "prefill_batches",
                     "decode_steps", "decode_batch_sum", "events"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        for name in ("prefill_busy_s", "decode_busy_s", "decode_wall_s", "decode_steps_ended", "link_busy_s"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        out.last_end = max(out.last_end, r.last_end)
        for reason, n in r.failed.items():
            out.failed[reason] = out.failed.get(reason, 0) + n
        for name in ("ttft", "tpot", "e2e"):
            getattr(out, name).merge(getattr(r, name))
        if out.records is not None:
            out.records.extend(r.records)
    return out


class _Plan:
    """Decode steps over one batch (the same committed slots) that the decode worker runs back to
    back while nothing else reaches its scheduler: step j (1-based) ends at `ends[j]` (`ends[0]`
    is when the first was dispatched); the scheduler has been told of steps 1..`done`; the event
    in the heap delivers steps up to `final` (`version` tells it from superseded ones)."""

    __slots__ = ("gen", "tokens", "batch", "durations", "key", "ends", "done", "final", "counted", "version")

    def __init__(self, gen: int, tokens: tuple, durations: list[float], key: tuple, start: float):
        self.gen, self.tokens, self.batch, self.durations = gen, tokens, len(tokens), durations
        self.key = key  # the durations' key in `Simulator.durations`
        self.ends = list(itertools.accumulate(durations, initial=start))  # as step after step would add them
        self.done = 0
        self.final = len(durations)
        self.counted = 0  # steps already counted as dispatched in the result
        self.version = 0


class _Unit:
    """The simulated workers of one unit: the prefill side, the link, the decode batch."""

    def __init__(self, index: int, fleet: Fleet):
        self.index = index
        self.sched = Scheduler(fleet.config, stream=False)
        self.cost = fleet.cost
        self.integrated = fleet.config.mode is Mode.INTEGRATED
        self.prompt: dict[str, int] = {}  # live request -> prompt tokens
        self.output: dict[str, int] = {}  # live request -> output tokens it will produce
        self.owner: list[str | None] = [None] * fleet.config.slots  # slot -> the request it is reserved for
        self.pending_slot: dict[str, int] = {}  # integrated: request in the prefill batch -> its slot
        # Committed slots: slot -> [its token in a step_done (request id, slot, token, finish), context
        # positions at commit, first step it is in, the value of `steps_done` after which it has all
        # its tokens].
        self.committed: dict[int, list] = {}
        self.plan: _Plan | None = None  # the decode steps in flight
        # Steps a plan covers at most: doubled when a plan runs to its end, cut to twice what ran
        # when another event cuts it (step times computed past the cut are wasted).
        self.horizon = _HORIZON_MIN
        self.step_tokens: tuple[tuple, ...] | None = None  # the committed slots' tokens, cached
        self.context = 0  # context positions over the committed slots
        self.steps_done = 0
        self.step_in_flight = False
        self.evicted_in_flight = 0  # slots of the step in flight evicted before it ended
        self.prefill_gen = self.decode_gen = 0  # bumped on a worker's restart: its stale completions drop
        self.link_free = 0.0
        # (start, end) of the transfers queued on the link, kept when the decode worker lands caches
        # between its steps (Simulator.listens_between_steps): a step waits for the one landing.
        self.transfers: collections.deque[tuple[float, float]] = collections.deque()
        self.step_deferred = False  # a step the scheduler decided waits for a cache to land
        self.prefill_free = 0.0  # when the prefill batch in flight ends
        self.prefill_runs: list[tuple[float, float]] = []  # (start, end) of recent prefill batches (contention)
        self.tick_at: float | None = None
        self.load = 0

    def commit(self, slot: int, rid: str) -> None:
        start = self.steps_done + (1 if self.step_in_flight else 0)
        # The first token comes from the prefill, then one per step.
        self.committed[slot] = [(rid, slot, 0, None), self.prompt[rid], start, start + self.output[rid] - 1]
        self.context += self.prompt[rid]
        self.step_tokens = None

    def evict(self, slot: int) -> None:
        self.owner[slot] = None
        c = self.committed.pop(slot, None)
        if c is None:
            return
        _, base, start, _ = c
        self.context -= base + max(0, self.steps_done - start)
        if self.step_in_flight and start <= self.steps_done:
            self.evicted_in_flight += 1
        self.step_tokens = None

    def lose_decode(self) -> None:
        for slot in list(self.committed):
            self.evict(slot)
        self.owner = [None] * len(self.owner)
        self.step_in_flight = False
        self.evicted_in_flight = 0
        self.plan = None
        self.decode_gen += 1
        self.transfers.clear()
        self.step_deferred = False

    def landing(self, now: float) -> float | None:
        """When the transfer streaming at `now` (started, not ended) lands; None if none is."""
        q = self.transfers
        while q and q[0][1] <= now:
            q.popleft()
        return q[0][1] if q and q[0][0] <= now else None


def _slowed(t: float, work: float, runs: list[tuple[float, float]], factor: float) -> float:
    """When `work` seconds of work started at `t` end, done `factor` times slower within each
    (start, end) of `runs` (in time order, not overlapping)."""
    for start, end in runs:
        if t >= end:
            continue
        if t < start:
            if t + work <= start:
                return t + work
            work -= start - t
            t = start
        if t + work * factor <= end:
            return t + work * factor
        work -= (end - t) / factor
        t = end
    return t + work


@contextlib.contextmanager
def _rare_collections():
    """Python's cycle collector, run less often while a simulation runs: its events allocate
    millions of short-lived objects without cycles, and by default every 700 allocations start a
    collection (with JAX imported, each also runs JAX's own callback). Objects alive before the
    run are frozen out of the collections (unless something froze some already), and the first
    generation is collected every 50,000 allocations; the settings come back afterwards. Nothing the simulation computes depends on it."""
    threshold = gc.get_threshold()
    freeze = gc.isenabled() and gc.get_freeze_count() == 0  # someone else's freeze is left alone
    if freeze:
        gc.freeze()
    gc.set_threshold(max(threshold[0], _COLLECT_EVERY), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if freeze:
            gc.unfreeze()


class Simulator:
    """Drive `fleet.units` schedulers through `workload`; `run()` returns a `SimResult`."""

    def __init__(self, fleet: Fleet, workload: Workload, slo: SLO = SLO(), keep_records: bool = False,
                 progress: Callable[[int], None] | None = None, progress_every: int = 4096,
                 request_ids: np.ndarray | None = None, bulk_steps: bool = True):
        self.fleet, self.workload, self.slo = fleet, workload, slo
        self.bulk_steps = bulk_steps  # False: one event per decode step (the reference for tests)
        self.ids = request_ids  # the requests' numbers (default: their index in the workload)
        self.units = [_Unit(i, fleet) for i in range(fleet.units)]
        self.heap: list = []
        self.durations: dict[tuple[int, int, int], list[float]] = {}  # see _durations
        self.rest_sums: dict[tuple[int, int, int], float] = {}  # a durations list's sum but its first (_count_steps)
        # Handoffs on the prefill worker (the cost source says so): a unit's handoffs and prefill
        # batches run one at a time, in the order they were decided, rather than side by side.
        self.handoff_on_prefill = fleet.config.mode is Mode.DISAGGREGATED and getattr(fleet.cost, "handoff_on_prefill",
                                                                                        False)
        # A decode worker that opens a handoff's listener between steps: the listener opens at the
        # end of the decode step in flight when the cache was placed, and only then is the transfer
        # queued on the prefill worker (behind the prefill batch sent with the placement).
        self.listens_between_steps = fleet.config.mode is Mode.DISAGGREGATED and getattr(
            fleet.cost, "listens_between_steps", False)
        # Workers that slow each other down while both work (the cost source says how much: the live
        # server's two workers share this machine): a prefill batch runs `prefill_slowdown` times
        # slower while the decode batch steps (see _contended_prefill_s), and decode steps run
        # `decode_slowdown` times slower while a prefill batch runs (see _stretch).
        slow = getattr(fleet.cost, "slowdowns", (1.0, 1.0)) if fleet.config.mode is Mode.DISAGGREGATED else (1.0, 1.0)
        self.prefill_slowdown, self.decode_slowdown = slow
        self.prefill_s: dict[tuple[int, ...], float] = {}  # prompt lengths of a batch -> its time (see _price)
        self.handoff_s: dict[int, float] = {}  # prompt tokens -> their handoff's time
        self.seq = itertools.count()
        self.result = SimResult(requests=len(workload), units=fleet.units, mode=fleet.config.mode.value,
                                records=[] if keep_records else None)
        self.progress, self.progress_every = progress, progress_every
        self.ended = 0
        self.events = 0  # scheduler events (the result's count, set when the run ends)
        self.rr = 0
        # Least-loaded routing: (load, index) of every unit, and superseded entries that are dropped
        # when they reach the top (an entry is current when its load is the unit's load).
        self.by_load = [(0, i) for i in range(fleet.units)]
        self.balancing = fleet.router is Router.LEAST_LOADED and fleet.units > 1
        deadlines = fleet.config.deadlines
        self.shortest_limit = min(getattr(deadlines, f.name) for f in dataclasses.fields(deadlines))

    def _push(self, t: float, kind: int, unit: _Unit, payload) -> None:
        """An event of `kind` for `unit` at `t` (entries compare by time, kind and push order)."""
        heapq.heappush(self.heap, (t, kind, next(self.seq), unit, payload))

    def run(self) -> SimResult:
        with _rare_collections():
            return self._run()

    def _run(self) -> SimResult:
        w, res = self.workload, self.result
        n = len(w)
        if n:
            res.first_arrival = float(w.arrival_s[0])
        heap, pop, complete, arrive = self.heap, heapq.heappop, self._complete, self._arrive
        for base in range(0, n, _CHUNK):
            end = min(n, base + _CHUNK)
            ids = range(base, end) if self.ids is None else self.ids[base:end].tolist()
            for rid, t, prompt_len, output_len in zip(map(str, ids), w.arrival_s[base:end].tolist(),
                                                      w.prompt_len[base:end].tolist(), w.output_len[base:end].tolist()):
                # Arrivals go after completions at the same instant (a slot freed now is free for them).
                while heap and heap[0][0] <= t:
                    complete(*pop(heap))
                arrive(rid, t, prompt_len, output_len)
        while heap:
            complete(*pop(heap))
        res.events = self.events
        return res

    def _route(self) -> _Unit:
        if self.fleet.router is Router.ROUND_ROBIN:  # arrival k goes to unit k mod units
            unit = self.units[self.rr]
            self.rr = (self.rr + 1) % len(self.units)
            return unit
        heap, units = self.by_load, self.units
        while heap[0][0] != units[heap[0][1]].load:
            heapq.heappop(heap)
        return units[heap[0][1]]  # the fewest live requests, ties to the lowest index

    def _load(self, unit: _Unit, change: int) -> None:
        unit.load += change
        if self.balancing:
            heapq.heappush(self.by_load, (unit.load, unit.index))
            if len(self.by_load) > 4 * len(self.units) + 64:  # drop the superseded entries
                self.by_load = [(u.load, u.index) for u in self.units]
                heapq.heapify(self.by_load)

    def _arrive(self, rid: str, t: float, prompt_len: int, output_len: int) -> None:
        limit = self.fleet.max_context
        if limit is not None and prompt_len + output_len > limit:
            res = self.result
            res.failed[TOO_LONG] = res.failed.get(TOO_LONG, 0) + 1
            res.last_end = max(res.last_end, t)
            if res.records is not None:
                res.records.append(RequestRecord(rid, -1, t, None, None, 0.0, 0, None))
            self._count_end()
            return
        unit = self.units[0] if len(self.units) == 1 else self._route()
        self._load(unit, 1)
        unit.prompt[rid] = prompt_len
        unit.output[rid] = output_len
        if unit.plan is None:
            self._apply(unit, unit.sched.arrive(t, rid, prompt_len, output_len), t)
        else:
            in_flight = self._catch_up(unit, t, True)  # arrivals follow completions at one instant
            self._apply(unit, unit.sched.arrive(t, rid, prompt_len, output_len), t)
            self._cut(unit, in_flight)

    def _complete(self, t: float, kind: int, _, unit: _Unit, payload) -> None:
        """The event of a heap entry (time, kind, push order, unit, payload) reaches its unit."""
        if kind == _STEP_DONE:
            plan, version = payload
            if plan is unit.plan and version == plan.version and plan.gen == unit.decode_gen:
                self._deliver(unit, plan, plan.final)
            return
        if kind == _PREFILL_DONE and payload[0] != unit.prefill_gen:
            return
        if kind == _LISTEN:  # nothing for the scheduler: the transfer is queued now
            rid, slot = payload
            if unit.owner[slot] == rid:
                self._ship(unit, t, rid, slot)
            return
        if kind == _TICK:  # only if it is still the unit's next one
            if unit.tick_at != t:
                return
            unit.tick_at = None
        in_flight = None if unit.plan is None else self._catch_up(unit, t, kind > _STEP_DONE)
        sched = unit.sched
        if kind == _HANDOFF_DONE:
            rid, slot = payload
            if unit.owner[slot] == rid and slot not in unit.committed:
                unit.commit(slot, rid)
            self._apply(unit, sched.handoff_done(t, rid, slot), t)
            if unit.step_deferred and unit.landing(t) is None:
                unit.step_deferred = False
                self._dispatch(unit, t)
        elif kind == _PREFILL_DONE:
            batch = payload[1]
            if unit.integrated:
                for rid in batch:
                    slot = unit.pending_slot.pop(rid, None)
                    if slot is not None and unit.owner[slot] == rid:
                        unit.commit(slot, rid)
            self._apply(unit, sched.prefill_done(t, [(rid, 0, None) for rid in batch]), t)
        elif kind == _CONTROL:
            ready, worker = payload
            self._apply(unit, sched.worker_ready(t, worker) if ready else sched.worker_died(t, worker), t)
        else:
            self._apply(unit, sched.tick(t), t)
        if in_flight is not None:
            self._cut(unit, in_flight)

    # Decode steps in bulk. A plan runs its batch until the first of its requests has all its
    # tokens; the scheduler hears of its steps in one StepDone at the end, or when another event
    # reaches the unit first (it then hears of the steps ended by then, and the plan is cut to the
    # step in flight, since that event may change what the next boundary decides). At every
    # boundary it is told of, the scheduler decides again; a plan only goes on if it decided one
    # more step over the same slots. So the scheduler sees the events one step per event would
    # give it, less the boundaries at which nothing could happen but another step.

    def _catch_up(self, unit: _Unit, t: float, inclusive: bool) -> _Plan | None:
        """Before another event at `t` reaches the unit: tell its scheduler of the decode steps that
        ended before `t` (at `t` too when `inclusive`: that event's kind comes after step ends at one
        instant). Returns the plan still in flight then, for `_cut`."""
        p = unit.plan
        if p is None:
            return None
        last = p.final - 1  # the final step comes by its own event
        if last > p.done:
            find = bisect.bisect_right if inclusive else bisect.bisect_left
            j = find(p.ends, t, p.done + 1, last + 1) - 1
            if j > p.done:
                self._deliver(unit, p, j)
        return p if unit.plan is p else None

    def _cut(self, unit: _Unit, p: _Plan | None) -> None:
        """After another event: the plan in flight before it stops at the step in flight."""
        if p is not None and unit.plan is p and p.final > p.done + 1:
            p.final = p.done + 1
            unit.horizon = max(_HORIZON_MIN, 2 * p.final)
            self._push_plan(unit, p)

    def _push_plan(self, unit: _Unit, p: _Plan) -> None:
        p.version += 1
        heapq.heappush(self.heap, (p.ends[p.final], _STEP_DONE, next(self.seq), unit, (p, p.version)))

    def _deliver(self, unit: _Unit, p: _Plan, j: int) -> None:
        """Steps `p.done + 1` to `j` have ended: one StepDone tells the scheduler."""
        self._count_steps(p, j)
        k = j - p.done
        res = self.result
        res.decode_wall_s += p.ends[j] - p.ends[p.done]  # back to back: step i ran from ends[i-1] to ends[i]
        res.decode_steps_ended += k
        unit.step_in_flight = False
        unit.context += k * p.batch - unit.evicted_in_flight
        unit.evicted_in_flight = 0
        unit.steps_done += k
        p.done = j
        t = p.ends[j]
        self._apply(unit, unit.sched.step_done(t, p.tokens, k, p.ends[j - 1] if k > 1 else None), t)
        if unit.plan is p and not unit.step_in_flight:
            unit.plan = None

    def _dispatch(self, unit: _Unit, now: float) -> None:
        """The scheduler decided a decode step: go on with the plan if its slots are the same,
        or plan anew."""
        p = unit.plan
        if p is None or p.gen != unit.decode_gen or unit.step_tokens is not p.tokens \
                or p.done == len(p.durations):
            tokens = unit.step_tokens
            if tokens is None:
                tokens = unit.step_tokens = tuple([c[0] for c in unit.committed.values()])
            n = 1
            if self.bulk_steps:
                if p is not None and p.done == len(p.durations) == p.final:  # the last plan ran to its end
                    unit.horizon = min(_HORIZON_MAX, 2 * unit.horizon)
                n = max(1, min(unit.horizon, min([c[3] for c in unit.committed.values()]) - unit.steps_done))
            key = (len(tokens), unit.context, n)
            p = unit.plan = _Plan(unit.decode_gen, tokens, self._durations(unit, key), key, now)
            if self.decode_slowdown != 1.0 and unit.prefill_free > now:
                self._stretch(unit, p)
            self._push_plan(unit, p)
        elif p.final < len(p.durations):  # cut short by an event that changed nothing for it: go on
            p.final = len(p.durations)
            self._push_plan(unit, p)
        unit.step_in_flight = True
        self._count_steps(p, p.done + 1)

    def _stretch(self, unit: _Unit, p: _Plan) -> None:
        """Re-time the steps of `p` from the one in flight on: a step's time is work done at
        1/`decode_slowdown` of the pace while a prefill batch runs (`unit.prefill_runs`)."""
        t = p.ends[p.done]  # when the step in flight started
        runs = unit.prefill_runs = [r for r in unit.prefill_runs if r[1] > t]
        ends = p.ends[:p.done + 1]
        for work in p.durations[p.done:]:
            t = _slowed(t, work, runs, self.decode_slowdown)
            ends.append(t)
        p.ends = ends

    def _durations(self, unit: _Unit, key: tuple[int, int, int]) -> list[float]:
        """The next `n` steps' times over `batch` sequences from `context` positions, `key` =
        (batch, context, n): each reads `batch` more positions. Remembered (a workload of fixed
        lengths asks for the same ones again and again); the lists are shared, so they are never
        changed."""
        d = self.durations.get(key)
        if d is None:
            batch, context, n = key
            cost = unit.cost
            many = getattr(cost, "decode_steps_s", None)
            if n > 1 and many is not None:
                d = many(batch, context + batch * np.arange(1, n + 1, dtype=np.int64)).tolist()
            else:
                d = [cost.decode_step_s(batch, context + batch * j) for j in range(1, n + 1)]
            if len(self.durations) >= _DURATIONS_KEPT:
                self.durations.clear()
                self.rest_sums.clear()
            self.durations[key] = d
        return d

    @staticmethod
    def _price(memo: dict, price: Callable, key):
        """`price(key)`, remembered: a workload's batches and prompts repeat (a cost source is a
        pure function of its arguments, and the units of a fleet share one)."""
        dt = memo.get(key)
        if dt is None:
            if len(memo) >= _PRICES_KEPT:
                memo.clear()
            dt = memo[key] = price(key)
        return dt

    def _count_steps(self, p: _Plan, upto: int) -> None:
        """Count steps up to `upto` of `p` as dispatched in the result."""
        counted = p.counted
        if upto > counted:
            res = self.result
            res.decode_steps += upto - counted
            res.decode_batch_sum += (upto - counted) * p.batch
            if upto == counted + 1:
                res.decode_busy_s += p.durations[counted]
            elif counted == 1 and upto == len(p.durations):  # a plan that ran to its end (the first step
                busy = self.rest_sums.get(p.key)  # was counted when it was dispatched): its sum, remembered
                if busy is None:
                    busy = self.rest_sums[p.key] = sum(p.durations[1:])
                res.decode_busy_s += busy
            else:
                res.decode_busy_s += sum(p.durations[counted:upto])
            p.counted = upto

    def _apply(self, unit: _Unit, d: Pending, now: float) -> None:
        """Carry out the scheduler's decision on an event at `now`."""
        self.events += 1
        if d.restart:
            self._restart(unit, now, d.restart)
        for slot in d.evict:
            unit.evict(slot)
        for rid, slot in d.placements:
            unit.owner[slot] = rid
            if unit.integrated:
                unit.pending_slot[rid] = slot
            elif self.listens_between_steps:
                # The decode worker opens the listener at the end of its step in flight (p.done + 1:
                # the steps ended before now are delivered); the engine then sends the transfer to
                # the prefill worker, behind this decision's prefill batch (an event after this one).
                p = unit.plan
                opens = p.ends[p.done + 1] if unit.step_in_flight and p is not None else now
                self._push(opens, _LISTEN, unit, (rid, slot))
            else:
                self._ship(unit, now, rid, slot)
        if d.prefill:
            prompts = unit.prompt
            lens = tuple([prompts[rid] for rid in d.prefill])
            dt = self.prefill_s.get(lens) or self._price(self.prefill_s, unit.cost.prefill_s, lens)
            if unit.committed and self.prefill_slowdown != 1.0:  # the decode worker is stepping
                dt = self._contended_prefill_s(unit, now, dt)
            self.result.prefill_busy_s += dt
            self.result.prefill_batches += 1
            start = now
            unit.prefill_free = start + dt
            self._push(unit.prefill_free, _PREFILL_DONE, unit, (unit.prefill_gen, d.prefill))
            if self.decode_slowdown != 1.0:
                unit.prefill_runs.append((start, unit.prefill_free))
                p = unit.plan
                if p is not None and p.final > p.done:  # steps in flight slow down from now on
                    self._stretch(unit, p)
                    self._push_plan(unit, p)
        if d.decode_step:
            if self.listens_between_steps and unit.landing(now) is not None:
                unit.step_deferred = True  # dispatched when the cache has landed (_complete)
            else:
                self._dispatch(unit, now)
        if d.finished or d.failed:
            self._record(unit, d)
        # A deadline set by this event is at least `now + shortest limit` away; while the unit's tick
        # comes before that, no new deadline can precede it and the lookup is skipped.
        if unit.tick_at is None or unit.tick_at > now + self.shortest_limit:
            deadline = unit.sched.next_deadline()
            if deadline is not None and (unit.tick_at is None or deadline < unit.tick_at):
                unit.tick_at = deadline
                self._push(deadline, _TICK, unit, None)

    def _contended_prefill_s(self, unit: _Unit, now: float, work: float) -> float:
        """The time of a prefill batch of `work` seconds alone that starts at `now` beside a stepping
        decode worker: `prefill_slowdown` times slower until the decode batch would empty (its
        committed requests' remaining steps, each as long as the next step alone, run
        `decode_slowdown` times slower meanwhile), at full pace after. A prefill-heavy mix's decode
        batch often empties partway through a prefill (the live server's lone 224-token prompts
        took 820-1060 ms beside a short decode batch, rather than all either 870 or 1110)."""
        p = unit.plan
        step = unit.cost.decode_step_s(len(unit.committed), unit.context)
        last = max([c[3] for c in unit.committed.values()])
        if unit.step_in_flight and p is not None:
            decode = max(0.0, p.ends[p.done + 1] - now) + max(0, last - unit.steps_done - 1) * step
        else:
            decode = max(0, last - unit.steps_done) * step
        both = decode * self.decode_slowdown  # how long the two run side by side, if the prefill lasts
        if work * self.prefill_slowdown <= both:
            return work * self.prefill_slowdown
        return both + work - both / self.prefill_slowdown

    def _ship(self, unit: _Unit, now: float, rid: str, slot: int) -> None:
        """Queue the transfer of `rid`'s cache into `slot` at `now`: it starts when the link is free
        (and the prefill worker, when it ships from there) and lands `handoff_s` later."""
        start = max(now, unit.link_free, unit.prefill_free) if self.handoff_on_prefill else max(now, unit.link_free)
        tokens = unit.prompt[rid]
        dt = self.handoff_s.get(tokens) or self._price(self.handoff_s, unit.cost.handoff_s, tokens)
        unit.link_free = start + dt
        if self.listens_between_steps:
            unit.transfers.append((start, start + dt))
        self.result.link_busy_s += dt
        self._push(start + dt, _HANDOFF_DONE, unit, (rid, slot))

    def _restart(self, unit: _Unit, now: float, workers) -> None:
        for w in workers:
            lost = (Worker.PREFILL, Worker.DECODE) if unit.integrated else (w,)
            if Worker.DECODE in lost:
                unit.lose_decode()
            if Worker.PREFILL in lost:
                unit.prefill_gen += 1
                unit.prefill_free = now
                unit.pending_slot.clear()
            self._push(now, _CONTROL, unit, (False, w))  # WorkerDied
            self._push(now + self.fleet.restart_s, _CONTROL, unit, (True, w))  # WorkerReady

    def _record(self, unit: _Unit, d: Pending) -> None:
        res, slo = self.result, self.slo
        for r, _, finish in d.finished:  # (the scheduler's request, its finish reason, when it finished)
            n = r.tokens
            ttft = r.first_token - r.arrival
            e2e = finish - r.arrival
            tpot = (e2e - ttft) / (n - 1) if n > 1 else None
            res.finished += 1
            res.output_tokens += n
            res.ttft.add(ttft)
            res.e2e.add(e2e)
            if tpot is not None:
                res.tpot.add(tpot)
                if tpot * slo.fast_tokens_per_s <= 1.0:
                    res.fast_tokens += n
            if ttft <= slo.ttft_s and (tpot or 0.0) <= slo.tpot_s:
                res.good += 1
            if res.records is not None:
                res.records.append(RequestRecord(r.id, unit.index, r.arrival, ttft, tpot, e2e, n))
            self._end(unit, r.id)
        for f in d.failed:
            res.failed[f.reason.value] = res.failed.get(f.reason.value, 0) + 1
            if res.records is not None:
                res.records.append(RequestRecord(f.request_id, unit.index, f.times.arrival, None, None,
                                                 f.times.finish - f.times.arrival, f.times.output_tokens, f.reason))
            self._end(unit, f.request_id)

    def _end(self, unit: _Unit, rid: str) -> None:
        self.result.last_end = unit.sched.now
        self._load(unit, -1)
        unit.prompt.pop(rid, None)
        unit.output.pop(rid, None)
        unit.pending_slot.pop(rid, None)
        self._count_end()

    def _count_end(self) -> None:
        self.ended += 1
        if self.progress is not None and self.ended % self.progress_every == 0:
            self.progress(self.ended)


def simulate(fleet: Fleet, workload: Workload, slo: SLO = SLO(), keep_records: bool = False,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Simulate `workload` on `fleet`; see the module docstring for what is modelled."""
    return Simulator(fleet, workload, slo, keep_records, progress).run()


def _simulate_part(fleet: Fleet, workload: Workload, slo: SLO, keep_records: bool, ids: np.ndarray) -> SimResult:
    return Simulator(fleet, workload, slo, keep_records, request_ids=ids).run()


def simulate_parallel(fleet: Fleet, workload: Workload, slo: SLO = SLO(), processes: int = 2,
                      keep_records: bool = False) -> SimResult:
    """`simulate` over `processes` processes, for a round-robin fleet: arrival k goes to unit
    k mod units whatever the state, so units never interact and each process simulates its share
    of them on its share of the arrivals. The result equals `simulate`'s (sums of floats aside)."""
    if fleet.router is not Router.ROUND_ROBIN:
        raise ValueError("only a round-robin fleet splits over processes (least-loaded routing couples the units)")
    processes = max(1, min(processes, fleet.units))
    if processes == 1:
        return simulate(fleet, workload, slo, keep_records)
    unit_of = np.arange(len(workload)) % fleet.units
    jobs, unit_ids = [], []
    for p in range(processes):
        units = np.arange(p, fleet.units, processes)  # this process's units, in the global order
        ids = np.flatnonzero(np.isin(unit_of, units))
        part = Workload(workload.arrival_s[ids], workload.prompt_len[ids], workload.output_len[ids], workload.name)
        jobs.append((dataclasses.replace(fleet, units=len(units)), part, slo, keep_records, ids))
        unit_ids.append(units)
    # Spawned, not forked: the parent may hold JAX's threads (the wafer profiler), which fork breaks.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        parts = list(pool.map(_simulate_part, *zip(*jobs)))
    for part, units in zip(parts, unit_ids):  # records name their process's units: renumber them
        if part.records is not None:
            part.records = [dataclasses.replace(r, unit=int(units[r.unit])) for r in part.records]
    return merge(parts)
