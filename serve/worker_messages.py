"""The typed messages between the engine (serve/engine.py) and its worker processes
(serve/workers.py), sent over `multiprocessing` Pipes. All are frozen dataclasses: they pickle as
they are and a test can compare them.

Commands go to a worker and are applied in the order sent; reports come back in the order the
worker produced them (so a slot's `Landed` always precedes the `StepReport` that decodes it).
"""

from __future__ import annotations

import dataclasses

from model.config import ModelConfig
from model.sampling import Sampling
from serve.events import RequestId

# Commands: engine -> worker.


@dataclasses.dataclass(frozen=True)
class PrefillItem:
    request_id: RequestId
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    slot: int | None = None  # integrated mode: the slot its cache goes into


@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """Prefill these prompts as one batch; the prefill worker keeps each cache by request id."""

    items: tuple[PrefillItem, ...]


@dataclasses.dataclass(frozen=True)
class Expect:
    """Decode worker: open a listener for `request_id`'s KV stream, to land in `slot`."""

    request_id: RequestId
    slot: int
    prompt_len: int  # the stream must carry exactly this many positions
    sampling: Sampling


@dataclasses.dataclass(frozen=True)
class Ship:
    """Prefill worker: stream `request_id`'s cache to the decode worker's listener on `port`."""

    request_id: RequestId
    port: int


@dataclasses.dataclass(frozen=True)
class Discard:
    """Prefill worker: drop `request_id`'s cache (never to be shipped)."""

    request_id: RequestId


@dataclasses.dataclass(frozen=True)
class Evict:
    """Free `slot`: evict it if committed, abort its reservation (and its stream) if landing."""

    slot: int


@dataclasses.dataclass(frozen=True)
class Step:
    """Run one decode step over the committed slots."""


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """Exit cleanly."""


Command = PrefillBatch | Expect | Ship | Discard | Evict | Step | Shutdown

# Reports: worker -> engine.


@dataclasses.dataclass(frozen=True)
class SramUse:
    """One decode core's SRAM plan (mesh/planner.py): bytes per core by kind, and the budget."""

    per_core_bytes: int
    budget: int | None  # None: no budget was set (the plan is still accounted)
    by_kind: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class WorkerSite:
    """Where a worker runs: its process, its CPUs, its meshes, and its decode cores' SRAM use."""

    pid: int
    cpus: tuple[int, ...]
    meshes: tuple[str, ...]  # e.g. "decode mesh 4x4 (vcores, psum)"
    sram: SramUse | None = None  # workers with a decode batch


@dataclasses.dataclass(frozen=True)
class Ready:
    """The worker has loaded the model, placed its meshes and compiled; it takes work."""

    config: ModelConfig
    capacity: int | None  # positions per decode slot (None: a worker without a decode batch)
    site: WorkerSite | None = None


@dataclasses.dataclass(frozen=True)
class PrefillReport:
    """One prefill batch: (request id, first token or None if it failed), in batch order."""

    outcomes: tuple[tuple[RequestId, int | None], ...]
    seconds: float  # the batch's whole time on the worker (0 if it failed)
    detail: str = ""  # why it failed


@dataclasses.dataclass(frozen=True)
class Listening:
    """The decode worker listens for `request_id`'s stream on 127.0.0.1:`port`."""

    request_id: RequestId
    slot: int
    port: int


@dataclasses.dataclass(frozen=True)
class Shipped:
    request_id: RequestId
    nbytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShipFailed:
    request_id: RequestId
    detail: str


@dataclasses.dataclass(frozen=True)
class Landed:
    """`request_id`'s cache is committed in `slot` and decodes from the next step on."""

    request_id: RequestId
    slot: int
    nbytes: int  # the stream's size on the wire


@dataclasses.dataclass(frozen=True)
class LandFailed:
    """The decode worker refused or lost the stream; the slot's reservation is aborted."""

    request_id: RequestId
    slot: int
    detail: str


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One decode step: (request id, slot, token) of every slot that decoded."""

    tokens: tuple[tuple[RequestId, int, int], ...]
    seconds: float


Report = Ready | PrefillReport | Listening | Shipped | ShipFailed | Landed | LandFailed | StepReport
