"""The serving engine: the scheduler (serve/scheduler.py) driving real worker processes on the
wall clock, behind the `Engine` protocol of serve/requests.py.

Everything runs on the front end's asyncio event loop, in one thread: `submit`, `finish` and
`cancel` become scheduler events at once; worker reports arrive through a reader on each worker's
pipe and become events too (serve/worker_messages.py -> serve/events.py); a timer sends `Tick` at
the scheduler's next deadline; a worker whose pipe ends has died (`WorkerDied`), is restarted and
announced again (`WorkerReady`) once it reports Ready. Each decision is applied in its documented
order (restart, evict, discard, placements, prefill, decode_step), then its tokens, finished and
failed requests go to the per-request output streams: `TokenOut`s, then exactly one `Done` or
`Failed` (a cancelled request's stream just ends).

Workers are started with multiprocessing's spawn context, which re-imports the program's main
module in each worker: a script that starts an engine must guard its entry point with
`if __name__ == "__main__":` (console scripts such as `wafer` already do).

Times (`RequestTimes` in `Done`) are on the event loop's clock (`loop.time()`, monotonic). Call
every method from the event loop that ran `start()`; none blocks it (commands to a worker are
written by a thread of its own, so a hung worker cannot stall the loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator

from mesh.errors import WaferError
from mesh.grid import Executor
from model.config import ModelConfig
from model.load import resolve_source
from serve.events import (Arrival, Decision, Disconnect, Event, FailReason, Failure, FinishReason, HandoffDone,
                          HandoffFailed, Mode, PrefillDone, PrefillOutcome, RequestId, SlotToken, Stage, StepDone,
                          Tick, Worker, WorkerDied, WorkerReady)
from serve.metrics import ServeMetrics
from serve.options import EngineOptions
from serve.requests import Done, EngineState, Failed, GenerateRequest, Output, TokenOut
from serve.scheduler import Scheduler
from serve.worker_handle import WorkerHandle
from serve.worker_messages import (Discard, Evict, Expect, Landed, LandFailed, Listening, PrefillBatch, PrefillItem,
                                   PrefillReport, Ready, Ship, ShipFailed, Shipped, Shutdown, Step, StepReport,
                                   WorkerSite)
from serve.worker_spec import Faults, Role, WorkerSpec

# A worker that has not reported Ready this long after `start()` fails the start.
START_TIMEOUT_S = 600.0
# `stop()` gives each worker this long to exit after Shutdown before killing it.
STOP_GRACE_S = 10.0
# A worker that died before reporting Ready is restarted after a delay that doubles up to a cap.
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 10.0
# Ticks fire just after a deadline, so the scheduler sees it reached.
TICK_SLACK_S = 1e-3

_END = object()  # ends a cancelled request's stream without an output


@dataclasses.dataclass
class _Live:
    request: GenerateRequest
    outputs: asyncio.Queue
    ending: str | None = None  # "finish" or "cancel" once the front end ended it
    prefilled_at: float | None = None  # when its first token came (the handoff starts)
    why: str = ""  # what a worker said went wrong with it, if anything


def split_cpus(options: EngineOptions) -> dict[Role, tuple[int, ...]]:
    """Each worker's CPUs: as given, else this process's CPUs split into two disjoint halves
    (prefill the lower, decode the upper; on one CPU they share it). Integrated: all of them."""
    mine = sorted(os.sched_getaffinity(0))
    for name in ("prefill_cpus", "decode_cpus"):
        given = getattr(options, name)
        if given is not None and (not given or not set(given) <= set(mine)):
            raise WaferError(f"{name} {list(given)} is not a non-empty subset of this process's CPUs {mine}")
    if options.mode is Mode.INTEGRATED:
        given = set(options.prefill_cpus or ()) | set(options.decode_cpus or ())
        return {Role.INTEGRATED: tuple(sorted(given)) if given else tuple(mine)}
    half = len(mine) // 2
    prefill, decode = (mine[:half], mine[half:]) if half else (mine, mine)
    return {Role.PREFILL: tuple(options.prefill_cpus or prefill), Role.DECODE: tuple(options.decode_cpus or decode)}


def check_options(options: EngineOptions) -> None:
    """Refuse what this engine cannot run, before any process starts."""
    if options.transport not in ("tcp", "jax"):
        raise WaferError(f"KV transport {options.transport!r}: expected tcp or jax")
    if options.distributed is not None:
        check_distributed(options)
    if options.executor is Executor.TRACE:
        raise WaferError("the trace executor runs nothing; serve with devices or vcores")
    if options.max_len < 2:
        raise WaferError(f"max_len must be at least 2 positions, got {options.max_len}")
    resolve_source(options.model, options.checkpoint)  # a missing checkpoint or unknown preset fails here


def check_distributed(options: EngineOptions) -> None:
    """A decode mesh spanning processes: the decode worker is process 0, of a devices mesh that the
    processes split evenly; the other processes are `wafer serve-decode-peer`s."""
    from mesh.distributed import check_process_args
    d = options.distributed
    check_process_args(d.coordinator, d.num_processes, d.process_id)
    if d.process_id != 0:
        raise WaferError(f"the server's decode worker is process 0 of the decode mesh, not {d.process_id}: start "
                         "the other processes with wafer serve-decode-peer")
    if options.mode is not Mode.DISAGGREGATED:
        raise WaferError("a decode mesh spanning processes needs --mode disaggregated (the integrated worker "
                         "keeps both meshes in one process)")
    if options.executor is not Executor.DEVICES:
        raise WaferError("a decode mesh spanning processes needs --executor devices (virtual cores live on one "
                         "device)")
    grid = options.decode_grid
    if grid.cores % d.num_processes:
        raise WaferError(f"a {grid} decode mesh ({grid.cores} cores) does not split evenly over {d.num_processes} "
                         "processes")


class WorkerEngine:
    """The `Engine` of serve/requests.py over real worker processes.

    `config` and `capacity` are known once `start()` has returned (the workers load the model; the
    front end never starts JAX for it). `faults` injects failures for tests (serve/worker_spec.py).
    """

    def __init__(self, options: EngineOptions, metrics: ServeMetrics, *, faults: Faults = Faults(),
                 start_timeout_s: float = START_TIMEOUT_S):
        check_options(options)
        self.options, self.metrics, self.start_timeout_s = options, metrics, start_timeout_s
        # The engine's mode is the one of the scheduler it drives.
        self.scheduler = Scheduler(dataclasses.replace(options.scheduler, mode=options.mode))
        self.integrated = options.mode is Mode.INTEGRATED
        self.handles = {role: WorkerHandle(WorkerSpec(role, options, faults), cpus, self._on_report, self._on_exit)
                        for role, cpus in split_cpus(options).items()}
        self._live: dict[RequestId, _Live] = {}
        self._config: ModelConfig | None = None
        self._capacity: int | None = None
        self._sites: dict[str, WorkerSite] = {}
        self._eos: frozenset[int] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick = None
        self._first_ready: asyncio.Future | None = None
        self._running = False
        self._stopped = False

    # The Engine protocol.

    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            raise WaferError("the engine's model config is known once start() has returned")
        return self._config

    @property
    def capacity(self) -> int:
        """The most positions (prompt + new tokens) one request may use."""
        if self._capacity is None:
            raise WaferError("the engine's capacity is known once start() has returned")
        return self._capacity

    async def start(self) -> None:
        """Start every worker; returns once all are ready (WaferError if one fails to start)."""
        if self._loop is not None:
            raise WaferError("the engine was already started")
        self._loop = asyncio.get_running_loop()
        self._first_ready = self._loop.create_future()
        for handle in self.handles.values():
            handle.start(self._loop)
        try:
            await asyncio.wait_for(asyncio.shield(self._first_ready), self.start_timeout_s)
        except TimeoutError:
            await self.stop()
            raise WaferError(f"the workers did not start within {self.start_timeout_s:g} s") from None
        except WaferError:
            await self.stop()
            raise
        self._running = True
        self._update_gauges()

    async def stop(self) -> None:
        """Fail every request in flight, stop every worker (killing those that do not exit) and reap it."""
        if self._stopped:
            return
        self._stopped, self._running = True, False
        if self._tick is not None:
            self._tick.cancel()
        for live in self._live.values():
            live.outputs.put_nowait(_END if live.ending == "cancel" else
                                    Failed(FailReason.WORKER_DIED, "the server is shutting down"))
        self._live.clear()
        for handle in self.handles.values():
            handle.send(Shutdown())
        for handle in self.handles.values():
            await self._wait_exit(handle, STOP_GRACE_S)
            handle.reap()
        self._update_gauges()

    def submit(self, request: GenerateRequest) -> AsyncIterator[Output]:
        """Queue a request; its outputs stream from the returned iterator. A request that can never
        run (not running, duplicate id, empty prompt, too long, a token outside the vocabulary)
        raises WaferError here."""
        self._check(request)
        live = _Live(request, asyncio.Queue())
        self._live[request.request_id] = live
        self._event(Arrival(self._now(), request.request_id, len(request.prompt_ids), request.max_new_tokens))
        return self._stream(live)

    def finish(self, request_id: RequestId) -> None:
        """A stop string ended it: its stream ends with Done(STOP); slot and cache are freed."""
        self._end(request_id, "finish")

    def cancel(self, request_id: RequestId) -> None:
        """Its client went away: its stream ends without another output; slot and cache are freed."""
        self._end(request_id, "cancel")

    def state(self) -> EngineState:
        s = self.scheduler
        ready = self._running and all(h.ready for h in self.handles.values())
        return EngineState(ready, len(s.waiting_ids()), len(s.slot_holders()), s.config.slots)

    # Views for tests and operators.

    def sites(self) -> dict[str, WorkerSite]:
        """Where each worker runs (its last start): process, CPUs, meshes, SRAM use; by role."""
        return dict(self._sites)

    def pids(self) -> dict[str, int]:
        """The worker processes alive now, by role ("prefill", "decode" or "integrated")."""
        return {role.value: h.pid for role, h in self.handles.items() if h.alive()}

    def is_ready(self, role: str) -> bool:
        return self.handles[Role(role)].ready

    # Requests.

    def _check(self, r: GenerateRequest) -> None:
        if not self._running:
            raise WaferError("the engine is not running")
        if r.request_id in self._live:
            raise WaferError(f"request {r.request_id!r} is already in flight")
        if not r.prompt_ids:
            raise WaferError("the prompt needs at least one token")
        if r.max_new_tokens < 1:
            raise WaferError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
        if len(r.prompt_ids) + r.max_new_tokens > self.capacity:
            raise WaferError(f"prompt ({len(r.prompt_ids)} tokens) + {r.max_new_tokens} new tokens exceeds the "
                             f"context of {self.capacity}")
        bad = [t for t in r.prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise WaferError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")

    async def _stream(self, live: _Live) -> AsyncIterator[Output]:
        while True:
            item = await live.outputs.get()
            if item is _END:
                return
            yield item
            if isinstance(item, (Done, Failed)):
                return

    def _end(self, request_id: RequestId, how: str) -> None:
        live = self._live.get(request_id)
        if live is None or live.ending is not None or not self._running:
            return
        live.ending = how
        self._event(Disconnect(self._now(), request_id))

    def _finish_reason(self, request_id: RequestId, token: int | None) -> FinishReason | None:
        """EOS when the token is one of the model's and the request did not ask to ignore it."""
        live = self._live.get(request_id)
        if live is not None and not live.request.ignore_eos and token in self._eos:
            return FinishReason.EOS
        return None

    # Events and decisions.

    def _now(self) -> float:
        return max(self._loop.time(), self.scheduler.now)

    def _event(self, event: Event) -> None:
        self._apply(self.scheduler.handle(event))
        self._update_gauges()
        self._arm_tick()

    def _arm_tick(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        deadline = self.scheduler.next_deadline()
        if deadline is not None and not self._stopped:
            self._tick = self._loop.call_at(deadline + TICK_SLACK_S, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._event(Tick(self._now()))

    def _handle_of(self, worker: Worker) -> WorkerHandle:
        if self.integrated:
            return self.handles[Role.INTEGRATED]
        return self.handles[Role.PREFILL if worker is Worker.PREFILL else Role.DECODE]

    def _send(self, worker: Worker, command) -> None:
        handle = self._handle_of(worker)
        if handle.ready:  # a worker that is down starts empty: nothing it missed matters to it
            handle.send(command)

    def _apply(self, d: Decision) -> None:
        for worker in d.restart:
            self._handle_of(worker).kill()  # its exit then restarts it, as any death does
        for slot in d.evict:
            self._send(Worker.DECODE, Evict(slot))
        if not self.integrated:
            for rid in d.discard:
                self._send(Worker.PREFILL, Discard(rid))
        slots = {}
        for p in d.placements:
            live = self._live[p.request_id]
            if self.integrated:
                slots[p.request_id] = p.slot
            else:
                self._send(Worker.DECODE, Expect(p.request_id, p.slot, len(live.request.prompt_ids),
                                                 live.request.sampling))
        if d.prefill:
            items = []
            for rid in d.prefill:
                r = self._live[rid].request
                items.append(PrefillItem(rid, r.prompt_ids, r.sampling, slots.get(rid)))
            self._send(Worker.PREFILL, PrefillBatch(tuple(items)))
        if d.decode_step:
            self._send(Worker.DECODE, Step())
        for t in d.tokens:
            self._live[t.request_id].outputs.put_nowait(TokenOut(t.token))
        for f in d.finished:
            self._live.pop(f.request_id).outputs.put_nowait(Done(f.reason, f.times))
        for f in d.failed:
            self._failed(f)

    def _failed(self, f: Failure) -> None:
        live = self._live.pop(f.request_id, None)
        if live is None:
            return
        if live.ending == "cancel":
            live.outputs.put_nowait(_END)
        elif live.ending == "finish" and f.reason is FailReason.DISCONNECTED:
            live.outputs.put_nowait(Done(FinishReason.STOP, f.times))
        else:
            stage = f" while {f.stage.value}" if f.stage is not None else ""
            detail = f.detail or live.why or f"{f.reason.value}{stage}"
            live.outputs.put_nowait(Failed(f.reason, detail, f.retry_after_s))

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.scheduler.waiting_ids()))
        self.metrics.slots_in_use.set(len(self.scheduler.slot_holders()))

    # Worker reports.

    def _on_report(self, handle: WorkerHandle, report) -> None:
        if self._stopped or handle.killed:
            return
        if isinstance(report, Ready):
            self._ready(handle, report)
            return
        if not handle.ready:
            return
        now = self._now()
        match report:
            case PrefillReport():
                if report.seconds:
                    self.metrics.prefill_step.observe(report.seconds)
                outcomes = []
                for rid, token in report.outcomes:
                    live = self._live.get(rid)
                    if live is not None:
                        live.prefilled_at = now
                        live.why = report.detail
                    outcomes.append(PrefillOutcome(rid, token, self._finish_reason(rid, token)))
                self._event(PrefillDone(now, tuple(outcomes)))
            case Listening():
                # Ship only to a listener its request still holds; an ended one is being evicted.
                if self.scheduler.slot_holders().get(report.slot) == report.request_id and \
                        self.scheduler.stage_of(report.request_id) is Stage.TRANSFERRING:
                    self._send(Worker.PREFILL, Ship(report.request_id, report.port))
            case Shipped():
                pass  # the decode side's Landed is what commits it
            case ShipFailed():
                self._event(HandoffFailed(now, report.request_id, report.detail))
            case Landed():
                live = self._live.get(report.request_id)
                if live is not None and live.prefilled_at is not None:
                    self.metrics.handoff_seconds.observe(now - live.prefilled_at)
                self.metrics.handoff_bytes.observe(report.nbytes)
                self._event(HandoffDone(now, report.request_id, report.slot))
            case LandFailed():
                self._event(HandoffFailed(now, report.request_id, report.detail))
            case StepReport():
                if report.tokens:
                    self.metrics.decode_step.observe(report.seconds)
                tokens = tuple(SlotToken(rid, slot, token, self._finish_reason(rid, token))
                               for rid, slot, token in report.tokens)
                self._event(StepDone(now, tokens))

    def _ready(self, handle: WorkerHandle, report: Ready) -> None:
        handle.ready, handle.failed_starts = True, 0
        self._sites[handle.role.value] = report.site
        if handle.role is not Role.PREFILL:
            self._capacity = min(report.capacity, report.config.max_seq_len)
        self._config = report.config
        self._eos = frozenset(report.config.eos_token_ids)
        if not self._running:
            if all(h.ready for h in self.handles.values()) and not self._first_ready.done():
                self._first_ready.set_result(None)
            return
        worker = Worker.PREFILL if handle.role is Role.PREFILL else Worker.DECODE
        self._event(WorkerReady(self._now(), worker))

    def _on_exit(self, handle: WorkerHandle) -> None:
        was_up = handle.ready or handle.killed  # a hung worker killed on purpose had started fine
        code = handle.reap()
        if self._stopped:
            return
        if not self._running:  # died while starting: the start fails
            if not self._first_ready.done():
                self._first_ready.set_exception(WaferError(
                    f"the {handle.role.value} worker exited with code {code} before it was ready"))
            return
        self.metrics.worker_restarts.labels(worker=handle.role.value).inc()
        worker = Worker.PREFILL if handle.role is Role.PREFILL else Worker.DECODE
        self._event(WorkerDied(self._now(), worker))
        handle.failed_starts = 0 if was_up else handle.failed_starts + 1
        delay = 0.0 if was_up else min(RESTART_DELAY_S * 2 ** handle.failed_starts, MAX_RESTART_DELAY_S)
        self._loop.call_later(delay, self._restart, handle)

    def _restart(self, handle: WorkerHandle) -> None:
        if not self._stopped and handle.proc is None:
            handle.start(self._loop)

    async def _wait_exit(self, handle: WorkerHandle, timeout_s: float) -> None:
        end = self._loop.time() + timeout_s
        while handle.alive() and self._loop.time() < end:
            await asyncio.sleep(0.05)
