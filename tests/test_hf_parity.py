"""The single-device decoder against HF transformers on the same weights.

Two kinds of model:
- SmolLM2-135M-Instruct from the embedded GGUF, which HF dequantizes and un-permutes with its own
  code (`hf_smollm2` fixture), so the loaders share nothing;
- random-weight Llama-3 (rope scaling, GQA), Qwen2 (QKV bias, tied and untied head) and Mistral
  (head dim != D / N, sliding window) checkpoints written by transformers (`hf_checkpoints`).

Greedy decoding must give identical tokens; logits agree within a tolerance stated at each
assert. Sampling cannot be compared with HF (the RNGs differ), so it gets determinism checks
here and `sample_ref`'s filters are compared with HF's logits warpers on their support.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.hf_peer import load_hf_model
from kernels.rope import rope_inv_freq
from kernels.sampling import sample_ref
from model.block import inv_freq_for
from model.cache import empty_cache
from model.config import SMOLLM2_135M, RopeScaling
from model.forward import forward
from model.generate import Generator
from model.sampling import Sampling
from model.hf_checkpoint import read_hf_config
from model.load import LoadedModel, load_model
from tests.helpers import hf_checkpoints
from tests.helpers.hf_reference import (NEW_TOKENS, SMOLLM2_LOGIT_RTOL, TINY_LOGIT_RTOL, assert_logits_close,
                                        assert_same_tokens, hf_greedy, hf_logits)

_forward = jax.jit(forward, static_argnums=1)


# ---------------------------------------------------------------------------------------------
# Helpers

def our_logits(loaded: LoadedModel, sequence: list[int], n_prefill: int,
               positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Our logits along `sequence`, through a prefill and then the decode steps.

    forward returns logits at one position per sequence, so the first n_prefill tokens are
    prefilled as a batch of P = len(positions) copies, copy p read at positions[p]; the copies
    then take one T=1 decode step per remaining token, each reading the KV cache the earlier
    steps wrote (the path generation takes).

    Returns:
      prefill logits [P, V] at `positions`, and decode logits [len - n_prefill, V] at positions
      n_prefill ... len - 1 (row 0 of the batch; every row holds the same sequence).
    """
    cfg = loaded.config
    P = len(positions)
    cache = empty_cache(cfg.n_layers, P, cfg.n_kv_heads, len(sequence), cfg.head_dim)
    zeros_P = jnp.zeros((P,), jnp.int32)
    prefill_PV, cache = _forward(loaded.params, cfg, jnp.asarray([sequence[:n_prefill]] * P, jnp.int32),
                                 zeros_P, jnp.asarray(positions, jnp.int32), cache)
    decode = []
    for pos in range(n_prefill, len(sequence)):
        logits_PV, cache = _forward(loaded.params, cfg, jnp.full((P, 1), sequence[pos], jnp.int32),
                                    jnp.full((P,), pos, jnp.int32), zeros_P, cache)
        decode.append(np.asarray(logits_PV[0]))
    return np.asarray(prefill_PV), np.asarray(decode).reshape(-1, cfg.vocab_size)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (embedded GGUF) against HF's load of the same file

# Every prompt is 33..64 tokens, so one compiled prefill (T=64) and one decode step (S=128)
# serve them all. The plain prompt has exactly as many tokens as the capital-of-France chat
# prompt, for the equal-length batch.
SMOLLM2_TEXT = {
    "plain": ("The history of the printing press begins in the fifteenth century, when Johannes "
              "Gutenberg of Mainz combined movable metal type with an oil-based ink and a wooden "
              "screw press. Within fifty years"),
    "code_unicode": "def mean(xs):\n    # 3 values: 12345, 3.14 and -7\n    total = sum(xs)\n"
                    "    return total / len(xs)  # café ☕ 東京\n",
}
SMOLLM2_CHAT = {
    "chat_capital": "What is the capital of France?",
    "chat_haiku": "Write a haiku about the sea.",
}


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2) -> dict[str, list[int]]:
    tok = smollm2.tokenizer
    prompts = {name: tok.encode(text) for name, text in SMOLLM2_TEXT.items()}
    prompts.update({name: tok.encode_chat(text) for name, text in SMOLLM2_CHAT.items()})
    return prompts


@pytest.fixture(scope="module")
def smollm2_generator(smollm2) -> Generator:
    """One generator for the module, so compiled shapes are shared between tests."""
    return Generator(smollm2.params, smollm2.config)


@pytest.fixture(scope="module")
def smollm2_hf_tokens(hf_smollm2, smollm2_prompts) -> dict[str, list[int]]:
    """HF greedy continuations (NEW_TOKENS each, EOS not stopping) of every prompt."""
    return {name: hf_greedy(hf_smollm2, [p], NEW_TOKENS)[0] for name, p in smollm2_prompts.items()}


@pytest.mark.parametrize("name", [*SMOLLM2_CHAT, *SMOLLM2_TEXT])
def test_smollm2_greedy_matches_hf(name, smollm2_prompts, smollm2_generator, smollm2_hf_tokens):
    ours = smollm2_generator.generate([smollm2_prompts[name]], NEW_TOKENS, stop_on_eos=False).tokens[0]
    assert len(ours) == NEW_TOKENS
    assert_same_tokens(ours, smollm2_hf_tokens[name], f"smollm2 {name}")


@pytest.mark.parametrize("names, equal_length", [(("chat_capital", "plain"), True),
                                                 (("chat_haiku", "code_unicode"), False)],
                         ids=["equal_length", "unequal_length"])
def test_smollm2_batch_matches_hf(names, equal_length, smollm2_prompts, smollm2_generator, smollm2_hf_tokens):
    """Prompts decoded together give each one's HF tokens (HF run one prompt at a time)."""
    prompts = [smollm2_prompts[n] for n in names]
    assert (len(prompts[0]) == len(prompts[1])) == equal_length, [len(p) for p in prompts]
    result = smollm2_generator.generate(prompts, NEW_TOKENS, stop_on_eos=False)
    for name, ours in zip(names, result.tokens):
        assert_same_tokens(ours, smollm2_hf_tokens[name], f"smollm2 batch {names}, row {name}")


def test_smollm2_logits_match_hf(smollm2, hf_smollm2, smollm2_prompts, smollm2_hf_tokens):
    """Prefill logits at several prompt positions (the last one included), then decode-step
    logits along HF's own greedy continuation, against one HF forward over the whole sequence."""
    prompt = smollm2_prompts["chat_haiku"]
    sequence = prompt + smollm2_hf_tokens["chat_haiku"][:8]
    theirs = hf_logits(hf_smollm2, sequence)
    positions = [0, 1, len(prompt) // 2, len(prompt) - 1]
    prefill, decode = our_logits(smollm2, sequence, len(prompt), positions)
    assert_logits_close(prefill, theirs[positions], SMOLLM2_LOGIT_RTOL, "smollm2 prefill")
    assert_logits_close(decode, theirs[len(prompt):], SMOLLM2_LOGIT_RTOL, "smollm2 decode steps")


def test_smollm2_chat_answer_stops_at_eos_like_hf(smollm2, smollm2_prompts, smollm2_generator,
                                                  smollm2_hf_tokens):
    # HF's greedy continuation cut after its first EOS is what HF generate returns when it stops
    # on EOS (greedy tokens do not depend on what comes later).
    eos = smollm2.config.eos_token_ids
    theirs = smollm2_hf_tokens["chat_capital"]
    first_eos = next((i for i, t in enumerate(theirs) if t in eos), None)
    assert first_eos is not None, f"HF's answer has no EOS within {NEW_TOKENS} tokens: {theirs}"
    prompt = smollm2_prompts["chat_capital"]
    ours = smollm2_generator.generate([prompt], NEW_TOKENS, stop_on_eos=True).tokens[0]
    assert_same_tokens(ours, theirs[: first_eos + 1], "smollm2 chat stopping on EOS")
    assert "Paris" in smollm2.tokenizer.decode(ours)


def test_smollm2_gguf_config_is_the_preset_and_agrees_with_hf(smollm2, hf_smollm2):
    ours = dataclasses.asdict(smollm2.config)
    preset = dataclasses.asdict(SMOLLM2_135M)
    assert ours == preset, {k: (ours[k], preset[k]) for k in ours if ours[k] != preset[k]}
    # HF read the same GGUF metadata with its own code.
    hf = hf_smollm2.config
    cfg = smollm2.config
    assert (cfg.vocab_size, cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert hf.rope_parameters.get("rope_type", "default") == "default"
    assert cfg.rms_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.max_seq_len == hf.max_position_embeddings
    assert cfg.tie_embeddings == bool(hf.tie_word_embeddings)
    assert cfg.bos_token_id == hf.bos_token_id
    assert cfg.eos_token_ids == (hf.eos_token_id,)


# ---------------------------------------------------------------------------------------------
# Random-weight HF checkpoints (Llama-3, Qwen2, Mistral) written by transformers

TINY_WRITERS = {
    "llama3": hf_checkpoints.write_llama3,
    "qwen2_tied": lambda path: hf_checkpoints.write_qwen2(path, tie=True),
    "qwen2_untied": lambda path: hf_checkpoints.write_qwen2(path, tie=False),
    "mistral": hf_checkpoints.write_mistral,
}
# Different lengths in one prompt bucket (T=64, S=128: one compiled prefill and step per batch
# size), all running past the 64 positions of the Llama-3 original context.
TINY_PROMPT_LENGTHS = (33, 47, 61)


@dataclasses.dataclass
class TinyCase:
    name: str
    ours: LoadedModel
    hf: object  # the transformers model
    prompts: list[list[int]]  # random ids, seeded by the case name
    hf_tokens: list[list[int]]  # HF's greedy continuation of each prompt
    generator: Generator


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    """name -> TinyCase, each built on first use and kept for the module."""
    cases: dict[str, TinyCase] = {}

    def get(name: str) -> TinyCase:
        if name not in cases:
            path = TINY_WRITERS[name](str(tmp_path_factory.mktemp(name)))
            # Fresh folders every session: caching their conversion would only fill the disk.
            ours = load_model(checkpoint=path, use_cache=False)
            hf = load_hf_model(path)
            rng = np.random.default_rng(sum(map(ord, name)))
            prompts = [rng.integers(0, ours.config.vocab_size, n).tolist() for n in TINY_PROMPT_LENGTHS]
            hf_tokens = [hf_greedy(hf, [p], NEW_TOKENS)[0] for p in prompts]
            cases[name] = TinyCase(name, ours, hf, prompts, hf_tokens, Generator(ours.params, ours.config))
        return cases[name]

    return get


@pytest.fixture(scope="module", params=list(TINY_WRITERS))
def tiny(request, tiny_cases) -> TinyCase:
    return tiny_cases(request.param)


def test_tiny_greedy_matches_hf(tiny):
    for prompt, theirs in zip(tiny.prompts, tiny.hf_tokens):
        # Varied tokens: a model stuck on one token would let a broken forward pass through.
        assert len(set(theirs)) >= 10, f"{tiny.name}: HF's continuation is degenerate: {theirs}"
        ours = tiny.generator.generate([prompt], NEW_TOKENS, stop_on_eos=False).tokens[0]
        assert_same_tokens(ours, theirs, f"{tiny.name} prompt of {len(prompt)} tokens")


def test_tiny_batch_of_unequal_prompts_matches_hf(tiny):
    result = tiny.generator.generate(tiny.prompts, NEW_TOKENS, stop_on_eos=False)
    for prompt, ours, theirs in zip(tiny.prompts, result.tokens, tiny.hf_tokens):
        assert_same_tokens(ours, theirs, f"{tiny.name} batch row of {len(prompt)} tokens")


def test_tiny_logits_match_hf(tiny):
    """Prefill logits at several prompt positions, then decode-step logits along HF's continuation."""
    prompt = tiny.prompts[-1]
    sequence = prompt + tiny.hf_tokens[-1]
    theirs = hf_logits(tiny.hf, sequence)
    # A few positions, not all: XLA's compile time grows with the batch of prompt copies.
    n = len(prompt)
    positions = [0, 1, n // 3, n // 2, n - 2, n - 1]
    prefill, decode = our_logits(tiny.ours, sequence, n, positions)
    assert_logits_close(prefill, theirs[positions], TINY_LOGIT_RTOL, f"{tiny.name} prefill")
    assert_logits_close(decode, theirs[len(prompt):], TINY_LOGIT_RTOL, f"{tiny.name} decode steps")


def test_tiny_config_agrees_with_hf(tiny):
    cfg, hf = tiny.ours.config, tiny.hf.config
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    shapes = (cfg.vocab_size, cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    assert shapes == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads, hf_head_dim)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rms_eps == hf.rms_norm_eps
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert ("lm_head" in tiny.ours.params) == (not hf.tie_word_embeddings)
    assert cfg.qkv_bias == tiny.name.startswith("qwen2")
    if tiny.name == "llama3":
        assert cfg.rope_scaling is RopeScaling.LLAMA3
        # HF's rotary frequencies, scaling applied, are the ones we compute.
        np.testing.assert_allclose(inv_freq_for(cfg), tiny.hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    else:
        assert cfg.rope_scaling is RopeScaling.NONE
    if tiny.name == "mistral":
        # Past the window HF's sliding-window attention would differ from ours: the context ends there.
        assert cfg.max_seq_len == hf.sliding_window == hf_checkpoints.MISTRAL_WINDOW
    else:
        assert cfg.max_seq_len == hf.max_position_embeddings


def test_llama3_legacy_config_keys_read_the_same(tmp_path, tiny_cases):
    """A transformers-4 config.json (`rope_theta`, `rope_scaling`) reads like the v5 one."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    legacy = hf_checkpoints.write_llama3(str(tmp_path / "legacy"), legacy_config_keys=True)
    with open(os.path.join(legacy, "config.json")) as f:
        raw = json.load(f)
    assert "rope_parameters" not in raw and raw["rope_scaling"]["rope_type"] == "llama3", raw
    ours = read_hf_config(legacy)
    current = tiny_cases("llama3").ours.config
    assert dataclasses.replace(ours, name=current.name) == current
    # HF reads the old keys to the same rotary frequencies.
    hf_inv_freq = LlamaRotaryEmbedding(AutoConfig.from_pretrained(legacy)).inv_freq.numpy()
    np.testing.assert_allclose(inv_freq_for(ours), hf_inv_freq, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama3", "qwen2_untied"])
def test_tiny_checks_would_catch_missing_rope_scaling_or_bias(name, tiny_cases):
    """Dropping the feature a checkpoint exists for moves logits far beyond the tolerance."""
    case = tiny_cases(name)
    cfg, params = case.ours.config, case.ours.params
    if name == "llama3":
        # Hand count: of the 8 frequencies, the first is above the high-frequency cutoff and
        # kept; the other 7 are interpolated or divided by 8.
        unscaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        assert np.sum(~np.isclose(unscaled, inv_freq_for(cfg))) == 7
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling.NONE)
    else:
        layers = [{**layer, "b_qkv": jnp.zeros_like(layer["b_qkv"])} for layer in params["layers"]]
        params = {**params, "layers": layers}
    broken = dataclasses.replace(case.ours, config=cfg, params=params)
    prompt = case.prompts[-1]
    theirs = hf_logits(case.hf, prompt)[-1:]
    prefill, _ = our_logits(broken, prompt, len(prompt), [len(prompt) - 1])
    err = np.max(np.abs(prefill - theirs))
    assert err > 20 * TINY_LOGIT_RTOL * np.max(np.abs(theirs)), err


# ---------------------------------------------------------------------------------------------
# Sampling: determinism on the tiny Llama-3 (not compared with HF: the RNGs differ)

def _sample(generator, prompt, **sampling):
    return generator.generate([prompt], NEW_TOKENS, Sampling(**sampling), stop_on_eos=False).tokens[0]


def test_sampling_is_seeded(tiny_cases):
    case = tiny_cases("llama3")
    prompt = case.prompts[1]
    first = _sample(case.generator, prompt, temperature=1.0, seed=0)
    again = _sample(case.generator, prompt, temperature=1.0, seed=0)
    other = _sample(case.generator, prompt, temperature=1.0, seed=1)
    assert first == again
    # Two seeds agreeing on 40 tokens at temperature 1 would mean the seed is ignored.
    assert first != other
    assert first != case.hf_tokens[1]  # and it is not greedy decoding


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k_1", "tiny_top_p"])
def test_sampling_that_keeps_one_token_is_greedy(filters, tiny_cases):
    """A filter that keeps only the most likely token reproduces greedy decoding (= HF's)."""
    case = tiny_cases("llama3")
    ours = _sample(case.generator, case.prompts[1], temperature=1.5, seed=7, **filters)
    assert_same_tokens(ours, case.hf_tokens[1], f"sampling with {filters}")


# ---------------------------------------------------------------------------------------------
# sample_ref against HF's logits warpers

N_DRAWS = 4000
_sample_ref = jax.jit(sample_ref, static_argnames="greedy")


def _draw(logits_V: np.ndarray, n: int = N_DRAWS, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> np.ndarray:
    """n samples [n] from one row of logits, each with its own key."""
    logits_nV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(_sample_ref(logits_nV, keys, jnp.float32(temperature), jnp.int32(top_k),
                                  jnp.float32(top_p), greedy=False))


def _hf_kept(logits_V: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> set[int]:
    """Token ids HF's warpers (temperature, then top-k, then top-p, as `generate` orders them) keep."""
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    scores = torch.tensor(logits_V, dtype=torch.float32)[None]
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())


@pytest.mark.parametrize("knobs", [
    dict(top_k=1), dict(top_k=5), dict(top_k=20), dict(top_p=0.3), dict(top_p=0.9),
    dict(temperature=0.7, top_k=12, top_p=0.8), dict(temperature=2.0, top_p=0.5),
], ids=lambda knobs: ",".join(f"{k}={v}" for k, v in knobs.items()))
def test_sample_ref_support_matches_hf_warpers(knobs):
    # Distinct logits (no ties at a threshold) spread enough that every kept token has a
    # probability of at least ~1e-3, so 4000 draws reach each of them.
    logits = np.random.default_rng(0).normal(size=48).astype(np.float32)
    picked = set(_draw(logits, **knobs).tolist())
    kept = _hf_kept(logits, **knobs)
    assert picked == kept, (f"sampled outside HF's kept set: {sorted(picked - kept)}; "
                            f"never sampled: {sorted(kept - picked)}")


def test_sample_ref_top_k_keeps_ties_and_renormalizes():
    # probabilities 0.5, 0.3, 0.15, 0.05; top-2 keeps the first two, renormalized to 5/8 and 3/8.
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    freq = np.bincount(_draw(logits, top_k=2), minlength=4) / N_DRAWS
    # 4000 draws: the standard error of a frequency near 0.6 is 0.008; 0.03 is ~4 sigma.
    np.testing.assert_allclose(freq, [5 / 8, 3 / 8, 0, 0], atol=0.03)
    # A tie at the k-th largest logit keeps every tied token (as HF's TopKLogitsWarper does).
    tied = np.array([3.0, 2.0, 2.0, 1.0, 0.0], np.float32)
    assert set(_draw(tied, top_k=2, temperature=5.0).tolist()) == {0, 1, 2}


def test_sample_ref_top_p_hand_cases():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    # Mass before each token: 0, 0.5, 0.8, 0.95. A token is kept while that is below p.
    assert set(_draw(logits, top_p=0.75).tolist()) == {0, 1}
    assert set(_draw(logits, top_p=0.85).tolist()) == {0, 1, 2}
    freq = np.bincount(_draw(logits, top_p=0.85), minlength=4) / N_DRAWS
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.03)


def test_sample_ref_tiny_top_p_picks_the_argmax():
    logits_BV = np.random.default_rng(1).normal(size=(64, 300)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 64)
    picked = _sample_ref(jnp.asarray(logits_BV), keys, jnp.float32(3.0), jnp.int32(0), jnp.float32(1e-6),
                         greedy=False)
    np.testing.assert_array_equal(np.asarray(picked), logits_BV.argmax(-1))
