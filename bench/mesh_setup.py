"""The decode mesh a command asked for, and the decoder built on it (`wafer generate --mesh`,
`wafer kv import`, `wafer bench decode --mesh`); the flags themselves live in `cli.flags`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernels.allreduce import Schedule
    from mesh.executors import Executor, Grid
    from mesh.wafer import WaferSpec
    from model.load import LoadedModel
    from model.wafer_layout import LayoutMode


@dataclasses.dataclass(frozen=True)
class MeshSetup:
    """A decode mesh: its grid, how its cores run, the all-reduce schedule (None: the fastest on
    this mesh, measured when the decoder is built), the K-tree groups per mesh axis (None: ~sqrt),
    the spec whose per-core budget the SRAM planner checks (None: no limit) and how heads lie
    over the columns (None: automatic)."""

    grid: Grid
    executor: Executor
    schedule: Schedule | None
    groups: int | None
    spec: WaferSpec | None
    layout: LayoutMode | None = None


def make_decoder(loaded: LoadedModel, mesh_setup: MeshSetup | None, batch: int, max_len: int, greedy: bool):
    """A `WaferDecoder` on `mesh_setup`, or the single-device `Generator` when it is None."""
    from model.generate import Generator

    if mesh_setup is None:
        return Generator(loaded.params, loaded.config)
    from kernels.allreduce import Schedule
    from kernels.schedule_choice import fastest_schedule
    from mesh.executors import make_core_mesh
    from model.wafer_decode import MeshOptions
    from model.wafer_generate import WaferDecoder
    from model.wafer_layout import LayoutMode

    core_mesh = make_core_mesh(mesh_setup.grid, mesh_setup.executor)
    # Planned and placed first (a layout that does not fit is refused before any measurement).
    decoder = WaferDecoder(loaded.params, loaded.config, core_mesh, batch, max_len,
                           MeshOptions(mesh_setup.schedule or Schedule.PSUM, mesh_setup.groups, greedy),
                           mesh_setup.spec, mode=mesh_setup.layout or LayoutMode.AUTO)
    if mesh_setup.schedule is None:  # --schedule auto: measured on this mesh at the step's width
        decoder.use_schedule(fastest_schedule(core_mesh, decoder.layout.d, batch, mesh_setup.groups)[0])
    return decoder
