"""What the scheduler reads and writes: its config, the events drivers send it, and the decision
it returns for each. Everything here is a frozen dataclass or an Enum, so a decision can be
logged, compared in a test, or sent to a worker as it is.

Every event carries its own `time` (seconds, on the driver's clock): the live server passes wall
time and the simulator passes simulated time, and the scheduler never reads a clock itself.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from serve.timings import RequestTimes

RequestId = str


class Mode(enum.Enum):
    """How prefill and decode share hardware."""

    DISAGGREGATED = "disaggregated"  # a prefill worker and a decode worker run concurrently
    INTEGRATED = "integrated"  # one worker: a prefill batch runs between two decode steps


class Worker(enum.Enum):
    """A worker process. In integrated mode both names mean the one worker."""

    __hash__ = object.__hash__  # by identity: the scheduler looks these up on every event

    PREFILL = "prefill"
    DECODE = "decode"


class Stage(enum.Enum):
    """Where a live request is."""

    __hash__ = object.__hash__  # by identity: the scheduler looks these up on every event

    WAITING = "waiting"  # in the bounded waiting queue
    PREFILLING = "prefilling"  # in the prefill batch in flight
    PREFILLED = "prefilled"  # cache on the prefill side, in the handoff queue, waiting for a slot
    TRANSFERRING = "transferring"  # cache streaming into its reserved slot
    DECODING = "decoding"  # in the decode batch


class FinishReason(enum.Enum):
    EOS = "eos"
    STOP = "stop"  # a stop string (the front end detokenizes, so it decides)
    LENGTH = "length"  # max new tokens reached (the scheduler decides this one itself)


class FailReason(enum.Enum):
    QUEUE_FULL = "queue_full"  # rejected at arrival; the front end answers 429 with Retry-After
    DEADLINE = "deadline"  # a stage overran its deadline
    WORKER_DIED = "worker_died"
    PREFILL_FAILED = "prefill_failed"
    HANDOFF_REFUSED = "handoff_refused"  # the decode side refused the KV stream
    DISCONNECTED = "disconnected"  # the client went away


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """Longest time, in seconds, each stage may take before its request is failed.

    A prefill batch or a decode step that overruns its deadline marks its worker hung: the
    scheduler fails what the worker holds and asks the driver to restart it.
    """

    queue_s: float = 60.0  # arrival -> start of its prefill
    prefill_s: float = 60.0  # start of a prefill batch -> its results
    handoff_s: float = 60.0  # prefill done -> cache committed in a slot (queueing and transfer)
    # Dispatch of a decode step -> its tokens, and a decoding request's last token -> its next.
    # In integrated mode a prefill between two steps counts too: set it above the longest prefill.
    token_s: float = 30.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"deadline {f.name} must be positive, got {getattr(self, f.name)}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Policy knobs. The defaults are a starting point for the live server, not measured optima."""

    mode: Mode = Mode.DISAGGREGATED
    slots: int = 8  # decode batch size
    max_waiting: int = 64  # waiting queue bound; an arrival beyond it is rejected
    max_prefill_batch: int = 8  # prompts in one prefill batch
    # Prompt tokens in one prefill batch. A longer prompt still runs, alone (the prefill chunks it).
    max_prefill_tokens: int = 8192
    # Disaggregated only: caches the prefill side holds at once (being prefilled or waiting in the
    # handoff queue for a slot): the prefill worker's memory for caches that decode cannot take yet.
    max_prefilled: int = 16
    retry_after_s: float = 1.0  # the hint sent with a queue-full rejection
    deadlines: Deadlines = Deadlines()

    def __post_init__(self):
        for name in ("slots", "max_waiting", "max_prefill_batch", "max_prefill_tokens", "max_prefilled"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.retry_after_s < math.inf:
            raise ValueError(f"retry_after_s must be finite and non-negative, got {self.retry_after_s}")


# Events: what drivers tell the scheduler.

@dataclasses.dataclass(frozen=True)
class Arrival:
    time: float
    request_id: RequestId
    prompt_len: int
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class PrefillOutcome:
    """One prompt of a prefill batch: its first token, or None if its prefill failed."""

    request_id: RequestId
    token: int | None
    finish: FinishReason | None = None  # the first token already ends it (EOS, a stop string)


@dataclasses.dataclass(frozen=True)
class PrefillDone:
    time: float
    outcomes: tuple[PrefillOutcome, ...]


@dataclasses.dataclass(frozen=True)
class HandoffDone:
    """The cache of `request_id` is committed in `slot` of the decode batch."""

    time: float
    request_id: RequestId
    slot: int


@dataclasses.dataclass(frozen=True)
class HandoffFailed:
    """The decode side refused or lost the KV stream; it has aborted the slot's reservation."""

    time: float
    request_id: RequestId
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class SlotToken:
    """One decoding request's token from a decode step."""

    request_id: RequestId
    slot: int
    token: int
    finish: FinishReason | None = None  # EOS or a stop string, as the worker or front end saw it


@dataclasses.dataclass(frozen=True)
class StepDone:
    """A decode step's tokens, or the last of `steps` consecutive steps over the same slots.

    Several steps in one event are for a driver that only counts tokens (the simulator, with a
    `Scheduler(..., stream=False)`): each slot gets `steps` tokens, the last at `time`, and
    `last_start` is when the last step was dispatched (the end of the one before it). The driver
    sends them only when nothing else would have reached the scheduler between them, so every
    boundary in between would have decided one more step and nothing else: no other event, no
    request reaching its token limit before the last step, no deadline passing before `time`.
    """

    time: float
    tokens: tuple[SlotToken, ...]
    steps: int = 1
    last_start: float | None = None


@dataclasses.dataclass(frozen=True)
class Disconnect:
    time: float
    request_id: RequestId


@dataclasses.dataclass(frozen=True)
class WorkerDied:
    """A worker process is gone; the driver sends nothing more from it and restarts it."""

    time: float
    worker: Worker


@dataclasses.dataclass(frozen=True)
class WorkerReady:
    """A (re)started worker takes work; its decode batch, if any, starts empty."""

    time: float
    worker: Worker


@dataclasses.dataclass(frozen=True)
class Tick:
    """Only the time moves: lets deadlines pass (drivers send one at `Scheduler.next_deadline()`)."""

    time: float


Event = Arrival | PrefillDone | HandoffDone | HandoffFailed | StepDone | Disconnect | WorkerDied | WorkerReady | Tick


# Decisions: what the scheduler tells drivers.

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a request's cache goes: disaggregated, stream the prefilled cache into `slot`
    (reserve, place_layer, commit); integrated, the slot its prefill lands in."""

    request_id: RequestId
    slot: int


@dataclasses.dataclass(frozen=True)
class Token:
    """An output token accepted for a request, to stream to its client."""

    request_id: RequestId
    token: int


@dataclasses.dataclass(frozen=True)
class Finished:
    request_id: RequestId
    reason: FinishReason
    times: RequestTimes


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request that ends without finishing; `stage` is None for a rejection at arrival."""

    request_id: RequestId
    reason: FailReason
    stage: Stage | None
    times: RequestTimes
    retry_after_s: float | None = None  # set for QUEUE_FULL
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do after one event (like vLLM v1's SchedulerOutput).

    Drivers apply the fields in this order: `restart`, `evict`, `discard`, `placements`,
    `prefill`, `decode_step`. Evictions come before placements because a slot freed by this
    decision may be placed into by the same decision. Workers apply decisions in the order they
    were made; events about requests that have since ended are ignored by the scheduler, so a
    worker never needs to know why a slot was taken back.
    """

    restart: tuple[Worker, ...] = ()  # hung workers: kill, restart, then send WorkerDied and WorkerReady
    evict: tuple[int, ...] = ()  # slots to take back: evict if committed, abort if reserved
    discard: tuple[RequestId, ...] = ()  # prefilled caches the prefill side drops, never to be shipped
    placements: tuple[Placement, ...] = ()
    prefill: tuple[RequestId, ...] = ()  # prefill these now, as one batch, in this order
    decode_step: bool = False  # run one decode step over the committed slots
    tokens: tuple[Token, ...] = ()
    finished: tuple[Finished, ...] = ()
    failed: tuple[Failure, ...] = ()
