"""Executors: run one per-core program over an R×C grid of cores.

A per-core program sees only its own tiles (no leading grid axes) and talks to other cores only
through collectives along the named axes `ROW` and `COL`. Every operand it receives is stored
globally as an array [R, C, *local]: entry (r, c) is what core (r, c) holds. The executors:

- DEVICES: `jax.shard_map` over a `Mesh` of R×C devices, operands sharded P(ROW, COL), so each
  device holds exactly its core's tiles (emulated CPU devices, several GPUs, several processes).
- VCORES: nested `jax.vmap` with axis names over R×C virtual cores on one device: the same
  collectives, resolved as array operations, for grids far larger than the device count.
- TRACE: `jax.make_jaxpr` of the program with the axes bound (`axis_env`) on abstract operands of
  one core's tile shapes: nothing is allocated or run, at any grid size. `mesh/trace.py` reads the
  jaxpr (FLOPs, every collective and its messages) for the profiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesh.axes import COL, ROW
from mesh.errors import WaferError
from mesh.grid import Executor, Grid  # noqa: F401 (re-exported: their home before mesh/grid.py)


@dataclasses.dataclass(frozen=True)
class CoreMesh:
    """A grid bound to an executor (and, for DEVICES, to the devices that hold the cores)."""

    grid: Grid
    executor: Executor
    mesh: Mesh | None = None  # DEVICES only

    def place(self, tree):
        """Put [R, C, *local] arrays where their cores live (one shard per device for DEVICES;
        for TRACE, one core's abstract value: [R, C, *local] -> ShapeDtypeStruct(local))."""
        if self.executor is Executor.TRACE:
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[2:], a.dtype), tree)
        if self.executor is Executor.VCORES:
            return jax.tree.map(jax.numpy.asarray, tree)
        sharding = NamedSharding(self.mesh, P(ROW, COL))

        # Each process copies only the tiles of its own devices. `jax.device_put` would do the
        # same, but on a mesh spanning processes it first all-gathers the whole host array to
        # check every process passed the same one: every weight, through the network.
        def put(a):
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.tree.map(put, tree)

    def broadcast(self, a) -> jax.Array:
        """A value every core holds alike, placed as [R, C, *a.shape]."""
        a = np.asarray(a)
        return self.place(np.broadcast_to(a, (self.grid.rows, self.grid.cols) + a.shape).copy())

    def zeros(self, local_shape: tuple[int, ...], dtype=np.float32) -> jax.Array:
        """[R, C, *local_shape] zeros made where they live (no host array of the whole thing)."""
        shape = (self.grid.rows, self.grid.cols) + tuple(local_shape)
        if self.executor is Executor.VCORES:
            return jax.numpy.zeros(shape, dtype)
        return jax.numpy.zeros(shape, dtype, device=NamedSharding(self.mesh, P(ROW, COL)))

    def run(self, program: Callable) -> Callable:
        """Lift a per-core `program(*local operands) -> local outputs` to [R, C, ...] arrays.

        TRACE is the exception: the lifted function takes one core's operands (arrays or
        `jax.ShapeDtypeStruct`s of the local shapes) and returns the program's `ClosedJaxpr`.
        """
        if self.executor is Executor.TRACE:
            return jax.make_jaxpr(program, axis_env=[(ROW, self.grid.rows), (COL, self.grid.cols)])
        if self.executor is Executor.VCORES:
            return jax.vmap(jax.vmap(program, axis_name=COL), axis_name=ROW)

        def per_device(*args):
            local = jax.tree.map(lambda a: a[0, 0], args)
            out = program(*local)
            return jax.tree.map(lambda a: a[None, None], out)

        # One PartitionSpec is a prefix for every operand and output: all are [R, C, ...].
        return jax.shard_map(per_device, mesh=self.mesh, in_specs=P(ROW, COL), out_specs=P(ROW, COL),
                             check_vma=False)


def make_core_mesh(grid: Grid, executor: Executor, devices: list | None = None) -> CoreMesh:
    """Bind `grid` to an executor. DEVICES uses the first R×C devices of `devices` (default: all)."""
    if executor in (Executor.VCORES, Executor.TRACE):
        return CoreMesh(grid, executor)
    devices = list(jax.devices()) if devices is None else list(devices)
    if len(devices) < grid.cores:
        raise WaferError(f"mesh {grid} needs {grid.cores} devices, {len(devices)} available "
                         f"(emulate CPU devices with mesh.devices.ensure_cpu_devices before JAX starts)")
    arr = np.array(devices[: grid.cores], dtype=object).reshape(grid.rows, grid.cols)
    return CoreMesh(grid, executor, Mesh(arr, (ROW, COL)))
