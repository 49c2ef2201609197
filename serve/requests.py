"""What the HTTP front end and the serving engine say to each other.

The front end (serve/http.py) turns an OpenAI request into a `GenerateRequest` of token ids and
hands it to an `Engine` (serve/engine.py: the scheduler driving the worker processes). The engine
streams back, per request, `TokenOut`s and then exactly one `Done` or `Failed`. The front end
detokenizes, so it alone sees stop strings: it calls `Engine.finish` when one appears, and
`Engine.cancel` when its client goes away; both free the request's slot and cache within one
decode step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from model.config import ModelConfig
from model.sampling import Sampling
from serve.events import FailReason, FinishReason, RequestId
from serve.timings import RequestTimes


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    request_id: RequestId
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    ignore_eos: bool = False  # keep generating past EOS (load generators send it)


@dataclasses.dataclass(frozen=True)
class TokenOut:
    token: int


@dataclasses.dataclass(frozen=True)
class Done:
    reason: FinishReason
    times: RequestTimes


@dataclasses.dataclass(frozen=True)
class Failed:
    reason: FailReason
    detail: str = ""
    retry_after_s: float | None = None  # set for QUEUE_FULL (the front end answers 429)


Output = TokenOut | Done | Failed


@dataclasses.dataclass(frozen=True)
class EngineState:
    """What /health and /metrics read."""

    ready: bool  # every worker is up
    waiting: int  # requests in the waiting queue
    slots_in_use: int
    slots: int


class Engine(Protocol):
    config: ModelConfig
    capacity: int  # the most positions (prompt + new tokens) one request may use

    async def start(self) -> None: ...  # start the workers; returns when they are ready

    async def stop(self) -> None: ...  # fail what is in flight, reap every worker

    def submit(self, request: GenerateRequest) -> AsyncIterator[Output]: ...

    def finish(self, request_id: RequestId) -> None: ...  # a stop string ended it

    def cancel(self, request_id: RequestId) -> None: ...  # its client went away

    def state(self) -> EngineState: ...
