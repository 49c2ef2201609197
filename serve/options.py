"""How a server is set up: the model, the mode, each worker's mesh and CPUs, and the scheduler's
policy. `wafer serve` parses its flags into one `EngineOptions`; the engine (serve/engine.py)
starts its workers from it."""

from __future__ import annotations

import dataclasses

from kernels.schedules import Schedule
from mesh.grid import Executor, Grid
from serve.events import Mode, SchedulerConfig


@dataclasses.dataclass(frozen=True)
class Distributed:
    """The decode worker's mesh spans processes through `jax.distributed` (mesh/distributed.py): the
    decode worker is process 0, `wafer serve-decode-peer` runs the others (serve/decode_peers.py)."""

    coordinator: str  # HOST:PORT
    num_processes: int
    process_id: int
    timeout_s: int = 60  # how long process 0 waits for the peers to join (mesh.distributed.INIT_TIMEOUT_S)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # an embedded preset (default: the embedded default model)
    checkpoint: str | None = None  # or a checkpoint path
    dtype: str | None = None  # weights, activations and caches (model/dtypes.py; None: the backend's default)
    mode: Mode = Mode.DISAGGREGATED
    prefill_grid: Grid = Grid(1, 1)  # the prefill mesh (devices executor)
    decode_grid: Grid = Grid(2, 2)  # the wafer decode mesh
    executor: Executor = Executor.DEVICES  # how the decode mesh's cores run
    # The decode mesh's all-reduce schedule; None: the fastest on it, measured when the decode worker starts.
    schedule: Schedule | None = Schedule.PSUM
    groups: int | None = None  # K-tree groups per mesh axis
    max_len: int = 2048  # positions per slot: prompt and output tokens together
    sram_budget: int | None = None  # bytes per decode core the SRAM planner checks (None: no limit)
    transport: str = "tcp"  # the KV handoff: "tcp" or "jax"
    # CPUs each worker is pinned to; None: the engine splits this machine's CPUs between them.
    prefill_cpus: tuple[int, ...] | None = None
    decode_cpus: tuple[int, ...] | None = None
    distributed: Distributed | None = None
    # The scheduler's policy; its `slots` is the decode batch size, its `mode` is replaced by `mode` above.
    scheduler: SchedulerConfig = SchedulerConfig()
