"""`--schedule auto`: the all-reduce schedule that runs fastest on a given core mesh, measured.

Which schedule wins depends on how the mesh executes, not on the model: on emulated CPU devices
every collective is a synchronization of the device threads, under the vcores executor a
`ppermute` is a gather over the whole grid and a `psum` one reduction, and on a wafer (the
profiler's cost model) the K-tree's short routes win. So the choice is a short measurement on
the mesh itself: a chain of MeshGEMVs with alternating reduction axes, the decode step's
pattern, timed under each schedule, the fastest kept. It costs a few small compilations, not a
decode step's.
Under the vcores executor there is nothing to measure: every schedule runs on one device as array
operations, where psum is one reduction and any other message a whole-grid gather, so psum.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from kernels.allreduce import Schedule
from kernels.mesh_gemv import mesh_gemv
from mesh.axes import COL, ROW
from mesh.executors import CoreMesh, Executor

# GEMVs per timed chain (alternating ROW and COL, as a decode layer's projections do) and timed
# runs per schedule; the median is kept. Chosen so a choice costs a few seconds on a 2-core CPU.
CHAIN_GEMVS = 12
CHOICE_REPEATS = 5
# A candidate within this factor of the fastest counts as a tie, and ties go to the earlier
# candidate (psum first): on a shared 2-core machine two schedules that issue the same number of
# collectives (psum and ring at 2 cores per axis) differ by noise, and a choice that flips between
# runs is worse than either.
TIE_FACTOR = 1.1


def schedule_chain_seconds(core_mesh: CoreMesh, schedule: Schedule, width: int, batch: int = 1,
                           groups: int | None = None, repeats: int = CHOICE_REPEATS) -> float:
    """Median seconds of `CHAIN_GEMVS` dependent MeshGEMVs of [batch, width] by [width, width]
    tiles on `core_mesh`, reduced with `schedule`."""
    rng = np.random.default_rng(0)
    R, C = core_mesh.grid.rows, core_mesh.grid.cols
    scale = 1.0 / np.sqrt(width * max(R, C))  # keeps the chain's values near 1 (no overflow)
    tiles = core_mesh.place((rng.standard_normal((R, C, CHAIN_GEMVS, width, width)) * scale).astype(np.float32))
    x = core_mesh.place(rng.standard_normal((R, C, batch, width)).astype(np.float32))

    def chain(x_Bw, w_nww):
        for i in range(CHAIN_GEMVS):
            x_Bw = mesh_gemv(x_Bw, w_nww[i], ROW if i % 2 == 0 else COL, schedule, groups)
        return x_Bw

    step = jax.jit(core_mesh.run(chain))
    jax.block_until_ready(step(x, tiles))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(x, tiles))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fastest_schedule(core_mesh: CoreMesh, width: int, batch: int = 1, groups: int | None = None,
                     candidates: tuple[Schedule, ...] = tuple(Schedule),
                     repeats: int = CHOICE_REPEATS) -> tuple[Schedule, dict[Schedule, float]]:
    """The first of `candidates` whose chain on `core_mesh` is within `TIE_FACTOR` of the shortest,
    and every candidate's median seconds. `width`: the per-core width of the activations
    (the layout's D per row). A TRACE mesh runs nothing: it gets the K-tree, the schedule
    WaferLLM measured fastest on a wafer and the profiler's default. A VCORES mesh gets psum
    without a measurement: there every schedule runs on one device as array operations, a psum
    one reduction over the grid axis and each ring or K-tree message a gather over the whole grid,
    so psum does the least work by construction; the short chain disagreed with the decode step
    (it chose the K-tree on 16x16 in one run, whose step then took 1.68x psum's:
    bench/RESULTS.md, issue 15's quiet figures)."""
    if core_mesh.executor is Executor.TRACE:
        return Schedule.KTREE, {}
    if core_mesh.executor is Executor.VCORES and Schedule.PSUM in candidates:
        return Schedule.PSUM, {}
    if core_mesh.grid.cores == 1:  # no all-reduce crosses a core: every schedule is the identity
        return candidates[0], {}
    seconds = {s: schedule_chain_seconds(core_mesh, s, width, batch, groups, repeats) for s in candidates}
    fastest = min(seconds.values())
    best = next(i for i, s in enumerate(candidates) if seconds[s] <= TIE_FACTOR * fastest)
    if jax.process_count() > 1:  # a mesh over processes: every process must compile the same step
        from jax.experimental import multihost_utils
        best = int(multihost_utils.broadcast_one_to_all(np.int32(best)))
    return candidates[best], seconds
