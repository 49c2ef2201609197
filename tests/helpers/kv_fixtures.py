"""Shared pieces of the KV handoff tests: a tiny model, its prompt, and a decode batch to land in."""

from __future__ import annotations

import numpy as np

from kvcache.format import header_for
from kvcache.sequence import model_fingerprint, prefill_sequence
from mesh.executors import Executor, Grid, make_core_mesh
from model.config import preset
from model.generate import Generator
from model.wafer_generate import WaferDecoder
from model.weights import init_random_params

PROMPT = [5, 9, 100, 7, 300, 11, 12, 40, 41]
OTHER_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 12
# Weights drawn with std 0.2 (not 0.02): nearly flat logits would let a wrong cache pick the same tokens.
WEIGHT_SCALE = 0.2


def tiny(name: str = "tiny-qwen2", seed: int = 3):
    config = preset(name)
    return init_random_params(config, seed=seed, scale=WEIGHT_SCALE), config


def solo_tokens(params, config, prompt, n=NEW_TOKENS) -> list[int]:
    return Generator(params, config).generate([prompt], n, stop_on_eos=False).tokens[0]


def export(params, config, prompt=PROMPT, prefill_grid=None, dtype=None):
    """(sequence, header) of a prompt prefilled for export."""
    seq = prefill_sequence(params, config, prompt, prefill_grid=prefill_grid)
    return seq, header_for(seq, config.name, model_fingerprint(config, params), dtype)


def busy_decoder(params, config, grid="2x2", batch=2, executor=Executor.DEVICES):
    """A decode batch whose slot 0 is already decoding OTHER_PROMPT (two steps in)."""
    dec = WaferDecoder(params, config, make_core_mesh(Grid.parse(grid), executor), batch, 64)
    seq, _ = export(params, config, OTHER_PROMPT)
    k = [seq.logical_layer(i)[0] for i in range(seq.n_layers)]
    v = [seq.logical_layer(i)[1] for i in range(seq.n_layers)]
    dec.insert(0, k, v, seq.length, seq.first_token)
    dec.step()
    dec.step()
    return dec


def decoder_state(dec) -> dict:
    """Everything a landing must not change in other slots (host copies)."""
    return {"tokens": dec.tokens.copy(), "pos": dec.pos.copy(), "active": dec.active.copy(),
            "free": dec.free_slots(), "k": [np.asarray(a).copy() for a in dec.k_cache],
            "v": [np.asarray(a).copy() for a in dec.v_cache]}


def assert_state_unchanged(before: dict, dec, slots=(0,)) -> None:
    after = decoder_state(dec)
    assert after["free"] == before["free"]
    for key in ("tokens", "pos", "active"):
        assert np.array_equal(after[key], before[key]), key
    for key in ("k", "v"):
        for a, b in zip(after[key], before[key]):
            for s in slots:  # [R, C, B, k, s, H]: the other slots' caches, bit for bit
                assert np.array_equal(a[:, :, s], b[:, :, s]), key


def decode_after_landing(dec, slot, first_token, n=NEW_TOKENS) -> list[int]:
    return [first_token] + [int(dec.step()[slot]) for _ in range(n - 1)]
