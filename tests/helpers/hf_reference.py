"""HF transformers as the reference: its greedy tokens and logits, and how ours are compared with them.

Used by the parity tests of the single-device decoder (test_hf_parity) and of the batched prefill
(test_prefill). The HF models come from `bench.hf_peer.load_hf_model`.
"""

from __future__ import annotations

import contextlib

import numpy as np

from bench import hf_peer

# Greedy tokens each parity test decodes and compares with HF's, per prompt.
NEW_TOKENS = 40

# Logit tolerances, as a fraction of the largest |logit|. float32 on both sides (JAX on CPU,
# PyTorch on CPU); measured on this suite's sequences: SmolLM2 up to 1.0e-4 abs on logits up to
# 38 (2.7e-6 of the scale, prefill and decode steps alike), the tiny models up to 1.3e-5 abs on
# logits up to 7.5 (1.7e-6). The bounds leave 10-20x headroom; the bugs these tests exist for
# (rope pairing or scaling, a dropped bias, eps, head split) move logits by tenths to whole units.
SMOLLM2_LOGIT_RTOL = 5e-5
TINY_LOGIT_RTOL = 2e-5


@contextlib.contextmanager
def torch_one_thread():
    """PyTorch on one thread while HF computes a reference.

    `load_hf_model` gives torch every core; on this 2-core machine, shared with XLA's CPU thread
    pool and other processes, two OpenMP threads spin-wait on each other: SmolLM2's 40-token HF
    greedy decode took 11-14 s with 2 threads on a busy machine, 1.8 s with 1 (1.8 s either way
    when idle).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF `generate`, greedy, EOS not stopping (`bench.hf_peer.hf_greedy`) on one thread."""
    with torch_one_thread():
        return hf_peer.hf_greedy(model, prompts, new_tokens, stop_on_eos=False)


def hf_logits(model, sequence: list[int]) -> np.ndarray:
    """HF's float32 logits [T, V] of one full forward (`bench.hf_peer.hf_logits`) on one thread."""
    with torch_one_thread():
        return hf_peer.hf_logits(model, sequence)


def assert_same_tokens(ours: list[int], theirs: list[int], what: str) -> None:
    """Identical greedy tokens, or a message naming the first step where they part."""
    if ours == theirs:
        return
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise AssertionError(f"{what}: tokens differ from HF at step {first} of {len(theirs)}\n"
                         f"  ours: {ours}\n  HF:   {theirs}")


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray, rtol: float, what: str) -> None:
    """max |ours - HF| <= rtol * max |HF|, and the same argmax wherever HF's top two are apart."""
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    err = float(np.max(np.abs(ours - theirs)))
    scale = float(np.max(np.abs(theirs)))
    assert err <= rtol * scale, f"{what}: max abs logit error {err:.3g} > {rtol:g} * max|logit| {scale:.3g}"
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * err  # an argmax the error could not flip
    np.testing.assert_array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear], err_msg=what)
