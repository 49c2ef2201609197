"""What a worker process is told when it starts: its role, the engine's options, and the faults a
test injects. Plain dataclasses and no heavy import (serve/worker_process.py unpickles these in a
fresh child before it has pinned its CPUs)."""

from __future__ import annotations

import dataclasses
import enum


class Role(enum.Enum):
    PREFILL = "prefill"  # disaggregated: the prefill mesh, caches held until shipped
    DECODE = "decode"  # disaggregated: the wafer decode mesh and its slots, caches landed from TCP
    INTEGRATED = "integrated"  # both meshes in one process: prefill between decode steps


@dataclasses.dataclass(frozen=True)
class Faults:
    """Faults injected on purpose, for tests of the engine's failure paths (empty in a server)."""

    # Requests whose KV stream the prefill worker sends with a wrong model fingerprint: the decode
    # worker's landing check refuses it, as it would refuse a cache made by another model.
    wrong_fingerprint: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    role: Role
    options: object  # serve.options.EngineOptions (not imported here: see the module docstring)
    faults: Faults = Faults()

    @property
    def devices(self) -> int:
        """CPU devices the worker's meshes need (integrated: both meshes share the first ones)."""
        from mesh.executors import Executor
        opts = self.options
        decode = opts.decode_grid.cores if opts.executor is Executor.DEVICES else 1
        if opts.distributed is not None:  # this process's share of a mesh spanning processes
            decode //= opts.distributed.num_processes
        return {Role.PREFILL: opts.prefill_grid.cores, Role.DECODE: decode,
                Role.INTEGRATED: max(decode, opts.prefill_grid.cores)}[self.role]
