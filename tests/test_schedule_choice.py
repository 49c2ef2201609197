"""`--schedule auto`: a valid schedule on every grid shape the tests use, and the measurement it
rests on."""

import pytest

from bench.mesh_setup import MeshSetup, make_decoder
from kernels.allreduce import Schedule
from kernels.schedule_choice import TIE_FACTOR, fastest_schedule
from mesh.executors import Executor, Grid, make_core_mesh
from model.config import TINY_LLAMA
from model.generate import Generator
from model.load import LoadedModel
from model.weights import init_random_params

# Every grid shape the tests run a decode or kernel on, by executor (devices: at most the 16
# emulated devices of conftest; larger grids run as vcores there too).
DEVICE_GRIDS = ["1x1", "1x2", "2x1", "1x4", "4x1", "3x1", "2x2", "2x3", "1x5", "1x6", "1x7", "2x4", "4x2", "2x6",
                "3x3", "3x4", "5x2", "1x12", "2x8", "4x4"]
VCORE_GRIDS = ["2x2", "2x9", "1x12", "2x12", "8x8", "4x36", "16x16", "8x72"]
FAST = {("2x2", Executor.DEVICES)} | {(g, Executor.VCORES) for g in VCORE_GRIDS}  # vcores: no measurement
CASES = [pytest.param(g, e, marks=[] if (g, e) in FAST else pytest.mark.slow, id=f"{g}-{e.value}")
         for e, grids in ((Executor.DEVICES, DEVICE_GRIDS), (Executor.VCORES, VCORE_GRIDS)) for g in grids]


@pytest.mark.parametrize("grid, executor", CASES)
def test_auto_chooses_a_measured_schedule(grid, executor):
    core_mesh = make_core_mesh(Grid.parse(grid), executor)
    chosen, seconds = fastest_schedule(core_mesh, width=8, repeats=1)
    assert chosen in tuple(Schedule)
    if core_mesh.grid.cores == 1:
        assert seconds == {}  # nothing crosses a core: no measurement
        return
    if executor is Executor.VCORES:  # one device: psum is one reduction, the others whole-grid gathers
        assert (chosen, seconds) == (Schedule.PSUM, {})
        return
    assert set(seconds) == set(Schedule) and all(t > 0 for t in seconds.values())
    assert seconds[chosen] <= TIE_FACTOR * min(seconds.values())
    # Ties go to the earlier candidate: nothing before the choice was within TIE_FACTOR.
    earlier = list(Schedule)[:list(Schedule).index(chosen)]
    assert all(seconds[s] > TIE_FACTOR * min(seconds.values()) for s in earlier)


def test_auto_on_a_trace_mesh_is_the_ktree_without_running():
    chosen, seconds = fastest_schedule(make_core_mesh(Grid(360, 360), Executor.TRACE), width=12)
    assert (chosen, seconds) == (Schedule.KTREE, {})



@pytest.mark.slow  # ~18 s under load; `kv import --mesh 3x3` (tests/test_kv_cli.py) decodes exactly on auto too
def test_auto_decoder_decodes_with_its_measured_schedule():
    params = init_random_params(TINY_LLAMA)
    loaded = LoadedModel(TINY_LLAMA, params, None, "random")
    decoder = make_decoder(loaded, MeshSetup(Grid(2, 2), Executor.DEVICES, None, None, None), 1, 32, greedy=True)
    assert decoder.opts.schedule in tuple(Schedule)
    prompt = [1, 5, 9, 2]
    expected = Generator(params, TINY_LLAMA).generate([prompt], 4, stop_on_eos=False).tokens[0]
    assert decoder.generate([prompt], 4, stop_on_eos=False).tokens[0] == expected
