"""The mesh flags shared by `wafer generate` and `wafer bench decode`."""

from __future__ import annotations

import argparse

from mesh.errors import WaferError


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, help="decode on an RxC core mesh (e.g. 2x2); default: one device")
    p.add_argument("--executor", choices=["devices", "vcores"], default="devices",
                   help="devices: one JAX device per core; vcores: virtual cores on one device")
    p.add_argument("--schedule", choices=["psum", "ring", "ktree"], default="psum", help="all-reduce schedule")
    p.add_argument("--groups", type=int, default=None, help="K-tree groups per mesh axis (default ~sqrt)")
    p.add_argument("--sram-budget", default=None,
                   help="per-core budget for the SRAM planner, e.g. 48KiB or 64MiB (default: no limit)")


def setup_mesh(args):
    """Parse the mesh flags and emulate CPU devices before JAX starts; None without --mesh."""
    if args.mesh is None:
        for flag in ("groups", "sram_budget"):
            if getattr(args, flag) is not None:
                raise WaferError(f"--{flag.replace('_', '-')} needs --mesh")
        return None
    from kernels.allreduce import Schedule
    from mesh.devices import ensure_cpu_devices
    from mesh.executors import Executor, Grid
    from mesh.wafer import emulated_spec, parse_bytes

    grid = Grid.parse(args.mesh)
    executor = Executor(args.executor)
    if executor is Executor.DEVICES:
        ensure_cpu_devices(grid.cores)
    if args.groups is not None and args.groups < 1:
        raise WaferError(f"--groups must be positive, got {args.groups}")
    spec = emulated_spec(parse_bytes(args.sram_budget)) if args.sram_budget else None
    return grid, executor, Schedule(args.schedule), args.groups, spec


def make_decoder(loaded, mesh_setup, batch: int, max_len: int, greedy: bool):
    """A `WaferDecoder` for the parsed mesh flags, or the single-device `Generator`."""
    from model.generate import Generator

    if mesh_setup is None:
        return Generator(loaded.params, loaded.config)
    from mesh.executors import make_core_mesh
    from model.wafer_decode import MeshOptions
    from model.wafer_generate import WaferDecoder

    grid, executor, schedule, groups, spec = mesh_setup
    return WaferDecoder(loaded.params, loaded.config, make_core_mesh(grid, executor), batch, max_len,
                        MeshOptions(schedule, groups, greedy), spec)
