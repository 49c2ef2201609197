"""A scripted `Engine` (serve/requests.py) for front-end tests: no model, no workers.

Each submitted request plays the engine's current `Script`: its tokens (up to the request's
`max_new_tokens`, ending at EOS unless `ignore_eos`), then Done, or a failure before or after
some tokens, or a hang that only `cancel`/`finish` (or a safety timeout) ends. Everything the
front end asked of it is recorded for the test to check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from mesh.errors import WaferError
from model.config import ModelConfig
from serve.events import FailReason, FinishReason
from serve.requests import Done, EngineState, Failed, GenerateRequest, TokenOut
from serve.timings import RequestTimes

HANG_LIMIT_S = 20.0  # a hanging request ends by itself after this, so no test can wait forever


@dataclasses.dataclass
class Script:
    tokens: tuple[int, ...] = ()
    fail: FailReason | None = None  # fail after the tokens (before any, with no tokens)
    retry_after_s: float | None = None
    hang: bool = False  # after the tokens, wait for cancel/finish
    token_delay_s: float = 0.0


class FakeEngine:
    def __init__(self, config: ModelConfig, capacity: int = 256, eos: int | None = None):
        self.config = config
        self.capacity = capacity
        self.eos = eos if eos is not None else (config.eos_token_ids[0] if config.eos_token_ids else None)
        self.script = Script()
        self.ready = True
        self.started = self.stopped = False
        self.submitted: list[GenerateRequest] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.waiting = 0
        self._wake: dict[str, asyncio.Event] = {}

    def reset(self, script: Script = Script()) -> None:
        self.script = script
        self.submitted.clear()
        self.finished.clear()
        self.cancelled.clear()

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        self.ready = False
        for event in self._wake.values():
            event.set()

    def state(self) -> EngineState:
        return EngineState(ready=self.ready, waiting=self.waiting, slots_in_use=len(self._wake), slots=4)

    def finish(self, request_id: str) -> None:
        self.finished.append(request_id)
        if request_id in self._wake:
            self._wake[request_id].set()

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        if request_id in self._wake:
            self._wake[request_id].set()

    def submit(self, request: GenerateRequest):
        if self.stopped:  # as serve.engine.WorkerEngine: a request that cannot run is refused at once
            raise WaferError("the engine is not running")
        self.submitted.append(request)
        return self._play(request, self.script)

    async def _play(self, request: GenerateRequest, script: Script):
        arrival = time.monotonic()
        rid = request.request_id
        if script.fail is FailReason.QUEUE_FULL:
            yield Failed(FailReason.QUEUE_FULL, "waiting queue full", script.retry_after_s)
            return
        wake = self._wake[rid] = asyncio.Event()
        times = []
        try:
            for token in script.tokens[:request.max_new_tokens]:
                if script.token_delay_s:
                    await asyncio.sleep(script.token_delay_s)
                if wake.is_set():  # finished or cancelled: one more step, then it is gone
                    break
                times.append(time.monotonic())
                yield TokenOut(token)
                if token == self.eos and not request.ignore_eos:
                    yield Done(FinishReason.EOS, RequestTimes(arrival, tuple(times), time.monotonic()))
                    return
            if script.hang and not wake.is_set():
                try:
                    async with asyncio.timeout(HANG_LIMIT_S):
                        await wake.wait()
                except TimeoutError:
                    yield Failed(FailReason.DEADLINE, "the fake engine's hang limit")
                    return
            if rid in self.cancelled:
                yield Failed(FailReason.DISCONNECTED)
            elif rid in self.finished:
                yield Done(FinishReason.STOP, RequestTimes(arrival, tuple(times), time.monotonic()))
            elif self.stopped:
                yield Failed(FailReason.WORKER_DIED, "engine stopped")
            elif script.fail is not None:
                yield Failed(script.fail, "scripted failure")
            else:
                reason = FinishReason.LENGTH if len(times) == request.max_new_tokens else FinishReason.EOS
                yield Done(reason, RequestTimes(arrival, tuple(times), time.monotonic()))
        finally:
            self._wake.pop(rid, None)
