r"""One process of a two-process wafer decode, launched by tests/test_multiprocess.py.

    python tests/helpers/workers/multiprocess_decode.py \
        COORDINATOR NUM_PROCESSES PROCESS_ID LOCAL_DEVICES GRID MODEL OUT_DIR

Joins the multi-process CPU mesh, lays a GRID (e.g. 2x2) of cores over the devices of all
processes, and decodes a fixed prompt greedily on it. Every process writes the tokens it read
back (from a core of its own) to OUT_DIR/process<ID>.json, and exits non-zero on any error, so a
failure is never silent.
"""

from __future__ import annotations

import json
import os
import sys

# The repository root (tests/helpers/workers/ is three folders below it) first on the path:
# this tree's modules, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from mesh.distributed import init_cpu_process  # noqa: E402  (must run before JAX starts)

# The prompt and length the test compares against the single-process decoder.
PROMPT = [1, 17, 42, 7, 300, 5, 99, 123, 64, 8, 250, 3]
NEW_TOKENS = 32


def load(model: str):
    """(params, config) of a preset: its real weights if embedded, else random ones (seed 0)."""
    from model.config import EMBEDDED_MODELS, preset
    if model in EMBEDDED_MODELS:
        from model.load import load_model
        loaded = load_model(model)
        return loaded.params, loaded.config
    from model.weights import init_random_params
    config = preset(model)
    return init_random_params(config, seed=0), config


def main(argv: list[str]) -> None:
    coordinator, num_processes, process_id, local_devices, grid_text, model, out_dir = argv
    process_id = int(process_id)
    init_cpu_process(coordinator, int(num_processes), process_id, int(local_devices))

    import jax

    from mesh.executors import Executor, Grid, make_core_mesh
    from model.wafer_generate import WaferDecoder

    grid = Grid.parse(grid_text)
    core_mesh = make_core_mesh(grid, Executor.DEVICES)
    mesh_processes = sorted({d.process_index for d in core_mesh.mesh.devices.flat})
    if mesh_processes != list(range(int(num_processes))):
        raise SystemExit(f"the {grid} mesh spans processes {mesh_processes}, not all {num_processes}")
    params, config = load(model)
    decoder = WaferDecoder(params, config, core_mesh, batch=1, max_len=len(PROMPT) + NEW_TOKENS)
    result = decoder.generate([PROMPT], NEW_TOKENS, stop_on_eos=False)
    # The prefill is a single-device jit on uncommitted arrays: it runs on the default device,
    # which must be one of this process's own.
    prefill_local = jax.numpy.zeros(()).devices() <= set(jax.local_devices())
    # Logits of the last step, gathered from every process (a collective: all processes call it).
    last_argmax = int(decoder.last_logits()[0].argmax())
    report = {"tokens": result.tokens[0], "last_argmax": last_argmax, "process_count": jax.process_count(),
              "mesh_processes": [d.process_index for d in core_mesh.mesh.devices.flat],
              "prefill_local": prefill_local, "tok_per_s": result.tok_per_s}
    with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1:])
