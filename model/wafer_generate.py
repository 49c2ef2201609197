"""Generation on a wafer decode mesh: prefill the prompts on a prefill mesh, place them into slots
of the decode batch, and decode them together until each is done."""

from __future__ import annotations

import time

import jax
import numpy as np

from mesh.errors import WaferError
from mesh.executors import CoreMesh, Executor, Grid, make_core_mesh
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from model.generate import GenerationResult, check_request, decode_loop
from model.prefill import Prefiller
from model.sampling import Sampling
from model.slot_batch import SlotBatch, core_copy
from model.wafer_decode import MeshOptions
from model.wafer_layout import LayoutMode
from model.weights import Params


class WaferDecoder(SlotBatch):
    """A slot batch with a generate loop: prompts prefilled through `Prefiller` (the one prefill
    path, shared with `wafer kv export`), then decoded in lockstep on the decode mesh."""

    def __init__(self, params: Params, config: ModelConfig, core_mesh: CoreMesh, batch: int, max_len: int,
                 opts: MeshOptions = MeshOptions(), spec: WaferSpec | None = None,
                 prefill_mesh: CoreMesh | None = None, mode: LayoutMode = LayoutMode.AUTO):
        """`prefill_mesh`: where prompts are prefilled (default: a 1x1 mesh on this process's first
        device, placed when `generate` first needs it)."""
        super().__init__(params, config, core_mesh, batch, max_len, opts, spec, mode)
        self._prefill_mesh = prefill_mesh
        self._prefiller: Prefiller | None = None

    @property
    def prefiller(self) -> Prefiller:
        if self._prefiller is None:
            mesh = self._prefill_mesh or make_core_mesh(Grid(1, 1), Executor.DEVICES, jax.local_devices())
            self._prefiller = Prefiller(self.params, self.config, mesh)
        return self._prefiller

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_on_eos: bool = True) -> GenerationResult:
        """Prefill the prompts, insert each into a slot, decode all together."""
        check_request(self.config, prompts, max_new_tokens)
        if len(prompts) > len(self.free_slots()):
            raise WaferError(f"{len(prompts)} prompts but only {len(self.free_slots())} free slots")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.capacity:
            raise WaferError(f"prompt ({longest}) + {max_new_tokens} new tokens exceeds this decoder's cache "
                             f"of {self.layout.max_len}")
        prefiller = self.prefiller
        t0 = time.perf_counter()
        prefilled = prefiller.prefill(prompts, sampling)
        compile_s = prefilled.compile_s
        slots = []
        for i, p in enumerate(prompts):
            k_LKSH, v_LKSH = prefilled.sequence_kv(i)
            slot = self.free_slots()[0]
            self.insert(slot, k_LKSH, v_LKSH, len(p), int(prefilled.first_tokens[i]), sampling)
            slots.append(slot)
        ttft = time.perf_counter() - t0 - compile_s
        compile_s += self.compile()  # outside the timed loop
        state = {"tok": self._replicate(self.tokens), "pos": self._replicate(self.pos)}

        def dispatch_step():
            state["tok"], state["pos"] = self.step_device(sampling, state["tok"], state["pos"])
            return state["tok"]

        eos = set(self.config.eos_token_ids) if stop_on_eos else set()
        run = decode_loop(dispatch_step, np.asarray(prefilled.first_tokens), max_new_tokens, eos,
                          read_tokens=lambda t: core_copy(t)[slots])
        self.tokens, self.pos = np.array(core_copy(state["tok"])), np.array(core_copy(state["pos"]))
        for s in slots:
            self.evict(s)
        return GenerationResult(run.tokens, ttft, run.seconds, run.steps, compile_s)
