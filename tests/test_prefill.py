"""The batched prefill on a prefill mesh against HF transformers' own prefill.

For every prompt of a mixed-length batch: the last-token logits and the whole K and V of every
layer against HF's `past_key_values` (HF run one prompt at a time, so no padding on its side),
and the first token against HF's argmax. Meshes: 1, 2 and 4 devices, tensor-parallel (1xC),
data-parallel (Rx1) and both (2x2); chunked prefill (chunk shorter than the longest prompt) on
some of them. Then prefill followed by decoding must give HF's greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.hf_peer import hf_prefill, load_hf_model
from mesh.errors import WaferError
from mesh.executors import Executor, Grid, make_core_mesh
from model.config import preset
from model.generate import Generator, cache_len_for
from model.load import load_model
from model.prefill import Prefiller
from model.sampling import Sampling
from model.weights import init_random_params
from tests.helpers import hf_checkpoints
from tests.helpers.hf_reference import (NEW_TOKENS, SMOLLM2_LOGIT_RTOL, TINY_LOGIT_RTOL, assert_logits_close,
                                        assert_same_tokens, hf_greedy, torch_one_thread)

# K and V tolerance, as a fraction of the layer's largest |HF value|. Measured: SmolLM2 up to
# 4.3e-5 abs on values up to 19 (2.3e-6 of the scale) on every mesh, the tiny models below 1e-6.
# A wrong rope pairing, position offset or head order moves them by whole units.
KV_RTOL = 2e-5


def _hf_reference(model, prompts):
    with torch_one_thread():
        return [hf_prefill(model, p) for p in prompts]


def assert_prefill_matches_hf(result, reference, logit_rtol: float, what: str) -> None:
    """Logits, first token, and every layer's K and V of each sequence against HF's prefill."""
    for i, (logits, hf_k, hf_v) in enumerate(reference):
        n = int(result.lengths[i])
        assert_logits_close(result.logits_BV[i][None], logits[None], logit_rtol, f"{what} seq {i} ({n} tokens)")
        assert result.first_tokens[i] == int(np.argmax(logits)), f"{what} seq {i}: first token differs from HF"
        k, v = result.sequence_kv(i)
        assert len(k) == len(hf_k)
        for layer, (ours, theirs) in enumerate(zip(k + v, hf_k + hf_v)):
            assert ours.shape == theirs.shape, (what, i, layer, ours.shape, theirs.shape)
            err = float(np.max(np.abs(ours - theirs)))
            scale = float(np.max(np.abs(theirs)))
            assert err <= KV_RTOL * scale, f"{what} seq {i} cache {layer}: error {err:.3g} > {KV_RTOL} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (embedded GGUF) against HF's load of the same file

@pytest.fixture(scope="module")
def smollm2_batch(smollm2) -> list[list[int]]:
    """Short and long prompts in one batch: 3 to ~150 tokens (several 32-token buckets apart)."""
    tok = smollm2.tokenizer
    long_text = ("Gutenberg's press spread across Europe within decades: by 1500 printing shops worked in "
                 "more than two hundred cities, and the price of books fell so far that ") * 4
    return [tok.encode("Hello there"), tok.encode_chat("What is the capital of France?"), tok.encode(long_text),
            tok.encode("def f(x):\n    return x * 2  # café")]


@pytest.fixture(scope="module")
def smollm2_reference(hf_smollm2, smollm2_batch):
    return _hf_reference(hf_smollm2, smollm2_batch)


# (grid, chunk): 1, 2 and 4 devices; TP over 4 columns pads SmolLM2's 3 KV heads to 4; chunk 64
# splits the longest prompt over three chunks that extend the cache. The default run covers
# 1, 2 and 4 devices with TP and DP; the other shapes run in `make test-all`.
SMOLLM2_MESHES = [("1x1", 2048), ("2x1", 64), ("2x2", 64),
                  pytest.param("1x2", 2048, marks=pytest.mark.slow), pytest.param("1x4", 2048, marks=pytest.mark.slow),
                  # 6 columns for 3 KV groups of 3: each KV head on 2 columns (tensor_parallel_layout)
                  pytest.param("1x6", 2048, marks=pytest.mark.slow)]


@pytest.mark.parametrize("grid, chunk", SMOLLM2_MESHES)
def test_smollm2_prefill_matches_hf(grid, chunk, smollm2, smollm2_batch, smollm2_reference):
    lengths = [len(p) for p in smollm2_batch]
    assert min(lengths) <= 5 and max(lengths) > 2 * 64, lengths  # short and multi-chunk prompts
    mesh = make_core_mesh(Grid.parse(grid), Executor.DEVICES)
    result = Prefiller(smollm2.params, smollm2.config, mesh, chunk=chunk).prefill(smollm2_batch)
    assert_prefill_matches_hf(result, smollm2_reference, SMOLLM2_LOGIT_RTOL, f"smollm2 {grid}")


def test_smollm2_prefill_then_decode_gives_hf_tokens(smollm2, hf_smollm2, smollm2_batch):
    """Prefill on a 2x2 mesh, move the cache to one device, decode: HF's greedy tokens."""
    prompts = smollm2_batch[:2]
    mesh = make_core_mesh(Grid(2, 2), Executor.DEVICES)
    result = Prefiller(smollm2.params, smollm2.config, mesh, chunk=64).prefill(prompts)
    cache = result.to_kvcache(cache_len_for(max(map(len, prompts)), NEW_TOKENS))
    out = Generator(smollm2.params, smollm2.config).continue_from(
        result.first_tokens, cache, [len(p) for p in prompts], NEW_TOKENS, stop_on_eos=False)
    for i, p in enumerate(prompts):
        assert_same_tokens(out.tokens[i], hf_greedy(hf_smollm2, [p], NEW_TOKENS)[0], f"smollm2 prompt {i}")


# ---------------------------------------------------------------------------------------------
# Random-weight Llama-3, Qwen2 and Mistral checkpoints

TINY_WRITERS = {
    "llama3": hf_checkpoints.write_llama3,
    "qwen2": lambda path: hf_checkpoints.write_qwen2(path, tie=True),
    "mistral": hf_checkpoints.write_mistral,
}


@pytest.fixture(scope="module", params=list(TINY_WRITERS))
def tiny(request, tmp_path_factory):
    path = TINY_WRITERS[request.param](str(tmp_path_factory.mktemp(request.param)))
    ours = load_model(checkpoint=path, use_cache=False)
    hf = load_hf_model(path)
    rng = np.random.default_rng(7)
    # Up to 80 tokens: + NEW_TOKENS stays inside Mistral's 128-token window (the model's context).
    prompts = [rng.integers(0, ours.config.vocab_size, n).tolist() for n in (61, 3, 33, 80)]
    return request.param, ours, hf, prompts, _hf_reference(hf, prompts)


@pytest.mark.parametrize("grid", ["1x1", "1x2", "2x1", "2x2"])
def test_tiny_prefill_matches_hf(grid, tiny):
    name, ours, _, prompts, reference = tiny
    mesh = make_core_mesh(Grid.parse(grid), Executor.DEVICES)
    result = Prefiller(ours.params, ours.config, mesh, chunk=32).prefill(prompts)
    assert_prefill_matches_hf(result, reference, TINY_LOGIT_RTOL, f"{name} {grid}")


def test_tiny_prefill_then_decode_gives_hf_tokens(tiny):
    name, ours, hf, prompts, _ = tiny
    result = Prefiller(ours.params, ours.config, make_core_mesh(Grid(1, 2), Executor.DEVICES)).prefill(prompts)
    cache = result.to_kvcache(cache_len_for(max(map(len, prompts)), NEW_TOKENS))
    out = Generator(ours.params, ours.config).continue_from(result.first_tokens, cache, [len(p) for p in prompts],
                                                           NEW_TOKENS, stop_on_eos=False)
    for prompt, tokens in zip(prompts, out.tokens):
        assert_same_tokens(tokens, hf_greedy(hf, [prompt], NEW_TOKENS)[0], f"{name} prompt of {len(prompt)}")


# ---------------------------------------------------------------------------------------------
# Padding, layout, memory, sampling, bad input (random weights, no HF)

@pytest.fixture(scope="module")
def tiny_llama():
    cfg = preset("tiny-llama")
    return cfg, init_random_params(cfg, seed=3, scale=0.2)


def test_padding_never_reaches_the_cache_or_other_sequences(tiny_llama):
    """Batch padding (3 prompts on 2 rows), right padding and chunk padding: the cache is zero
    past each prompt, and each prompt's results are what it gets prefilled alone."""
    cfg, params = tiny_llama
    prompts = [[5, 9, 2, 7, 1], list(range(1, 41)), [3]]
    mesh = make_core_mesh(Grid(2, 2), Executor.DEVICES)
    prefiller = Prefiller(params, cfg, mesh, chunk=32)
    together = prefiller.prefill(prompts)
    assert together.k_cache[0].shape[:3] == (2, 2, 2)  # [R, C, b]: 3 prompts padded to 2 per row
    for which in ("k", "v"):
        for layer in together.host_cache(which):
            for i, n in enumerate(together.lengths):
                assert np.all(layer[i, :, n:] == 0), f"{which} cache holds padding past position {n}"
                assert np.any(layer[i, :, :n] != 0)
    # Alone and batched are different matrix shapes, which round differently: measured up to
    # 2.7e-6 on K values up to ~0.1-1; leaked padding would be whole units.
    for i, p in enumerate(prompts):
        alone = prefiller.prefill([p])
        np.testing.assert_allclose(together.logits_BV[i], alone.logits_BV[0], rtol=0, atol=1e-5)
        for a, b in zip(together.sequence_kv(i)[0], alone.sequence_kv(0)[0]):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_prefill_layout_is_documented_one(tiny_llama):
    """Entry [r, c, j, i, p] of the prefill cache is sequence r*b + j, KV head c*kc + i."""
    cfg, params = tiny_llama
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    result = Prefiller(params, cfg, make_core_mesh(Grid(2, 2), Executor.DEVICES)).prefill(prompts)
    raw = np.asarray(result.k_cache[1])  # [R, C, b, kc, S, H]
    R, C, b, kc = raw.shape[:4]
    assert (R, C, b, kc) == (2, 2, 2, cfg.n_kv_heads // 2)
    k_single = [np.asarray(k) for k in Generator(params, cfg).prefill(prompts, raw.shape[4], Sampling()).cache.k_LBKSH]
    for r in range(R):
        for c in range(C):
            for j in range(b):
                seq, n = r * b + j, len(prompts[r * b + j])
                np.testing.assert_allclose(raw[r, c, j, :, :n], k_single[1][seq, c * kc:(c + 1) * kc, :n], atol=2e-5)


@pytest.mark.parametrize("executor", [Executor.DEVICES, Executor.VCORES])
def test_prefill_splits_kv_groups_from_2k_columns(tiny_llama, executor):
    """tiny-llama (2 KV heads of 2 query heads) on 4 columns: one query head per column and each
    KV head on two columns, so no column holds zero attention tiles. The first tokens and the
    cache equal the single-device prefill's, and the handoff's sequence carries the wire layout
    (`PrefillKVLayout`: KV head h on column h, columns 2 and 3 zero padding), one copy each."""
    from kvcache.sequence import sequence_from_prefill
    from model.wafer_layout import tensor_parallel_layout
    cfg, params = tiny_llama
    layout = tensor_parallel_layout(cfg, 4)
    assert (layout.kc, layout.nc, layout.rep) == (1, 1, 2)
    assert layout.kv_heads_by_column == ((0,), (0,), (1,), (1,)) and layout.kv_head_sources == ((0, 0), (2, 0))
    prompts = [[1, 2, 3], list(range(4, 44))]
    result = Prefiller(params, cfg, make_core_mesh(Grid(1, 4), executor), chunk=32).prefill(prompts)
    single = Generator(params, cfg).prefill(prompts, result.max_len, Sampling())
    np.testing.assert_array_equal(result.first_tokens, np.asarray(single.first_B))
    for i, n in enumerate(result.lengths):
        seq = sequence_from_prefill(result, i)
        assert seq.layout.padded_heads == 4
        for which, ref in (("k", single.cache.k_LBKSH), ("v", single.cache.v_LBKSH)):
            host, wire = result.host_cache(which), (seq.k_LKSH if which == "k" else seq.v_LKSH)
            for layer in range(cfg.n_layers):
                want = np.asarray(ref[layer])[i, :, :n]
                np.testing.assert_allclose(host[layer][i, :, :n], want, atol=2e-5)
                got = np.asarray(wire[layer])
                np.testing.assert_allclose(got[:2], want, atol=2e-5)
                assert not got[2:].any()


def test_prefill_memory_grows_linearly_with_the_prompt(tiny_llama):
    """The compiled chunk program's temporaries for 1024, 2048 and 4096 tokens: doubling the
    prompt doubles them, and at 4096 they stay far below one T x T score matrix."""
    cfg, params = tiny_llama
    prefiller = Prefiller(params, cfg, make_core_mesh(Grid(1, 1), Executor.DEVICES), chunk=4096)
    mesh, kc, H = prefiller.core_mesh, prefiller.layout.kc, cfg.head_dim
    temp = {}
    for T in (1024, 2048, 4096):
        args = (prefiller.tiles, tuple(mesh.zeros((1, kc, T, H)) for _ in range(cfg.n_layers)),
                tuple(mesh.zeros((1, kc, T, H)) for _ in range(cfg.n_layers)), mesh.broadcast(np.zeros((1, T), np.int32)),
                mesh.broadcast(np.full((1,), T, np.int32)), mesh.broadcast(np.int32(0)), mesh.zeros((1, cfg.dim)))
        temp[T] = prefiller._chunk_fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp[2048] <= 2.2 * temp[1024] and temp[4096] <= 2.2 * temp[2048], temp  # quadratic would be 4x
    scores_4096 = cfg.n_heads * 4096 * 4096 * 4  # float32 [N, T, T]
    assert temp[4096] < scores_4096 / 8, (temp, scores_4096)


def test_precompile_covers_every_length_bucket(tiny_llama):
    """After `precompile(max_prompt_len, batch sizes)` (run on another thread, as a serving worker
    does), no prefill of a batch of that size with prompts up to that length compiles anything,
    greedy or sampled, chunked or not; a batch size it did not cover still compiles."""
    import threading
    cfg, params = tiny_llama
    prefiller = Prefiller(params, cfg, make_core_mesh(Grid(1, 1), Executor.DEVICES), chunk=32)
    assert prefiller.precompile_shapes(64, (1, 2)) == [(1, 32, 32), (1, 32, 64), (2, 32, 32), (2, 32, 64)]
    worker = threading.Thread(target=prefiller.precompile, args=(64, (2,)))
    worker.start()
    worker.join()
    compiled = prefiller.compiles
    assert compiled == 2 + 2  # the 2 chunk shapes, a greedy and a sampled head
    for length in (1, 33, 64):
        sampling = Sampling(temperature=1.0, seed=length) if length % 2 else Sampling()
        assert prefiller.prefill([[7] * length] * 2, sampling).compile_s == 0.0, length
    assert prefiller.compiles == compiled
    assert prefiller.prefill([[7] * 5]).compile_s > 0 and prefiller.compiles == compiled + 2  # batch size 1


def test_sampled_first_token(tiny_llama):
    """top_k = 1 is the argmax; a seeded draw repeats and stays inside the top k."""
    cfg, params = tiny_llama
    prefiller = Prefiller(params, cfg, make_core_mesh(Grid(1, 2), Executor.DEVICES))
    prompts = [[1, 2, 3, 4], [9, 8]]
    greedy = prefiller.prefill(prompts)
    top1 = prefiller.prefill(prompts, Sampling(temperature=0.7, top_k=1, seed=3))
    np.testing.assert_array_equal(top1.first_tokens, greedy.first_tokens)
    draws = {tuple(prefiller.prefill(prompts, Sampling(temperature=1.5, top_k=5, seed=s)).first_tokens)
             for s in range(4)}
    assert len(draws) > 1  # the seed matters
    again = prefiller.prefill(prompts, Sampling(temperature=1.5, top_k=5, seed=0)).first_tokens
    assert tuple(again) in draws
    top5 = np.argsort(greedy.logits_BV, axis=-1)[:, -5:]
    for draw in draws:
        assert all(t in top5[i] for i, t in enumerate(draw)), draw


def test_bad_requests_are_refused(tiny_llama):
    cfg, params = tiny_llama
    mesh = make_core_mesh(Grid(1, 1), Executor.DEVICES)
    with pytest.raises(WaferError, match="multiple of 32"):
        Prefiller(params, cfg, mesh, chunk=48)
    prefiller = Prefiller(params, cfg, mesh)
    with pytest.raises(WaferError, match="at least one token"):
        prefiller.prefill([[1, 2], []])
    with pytest.raises(WaferError, match="outside the vocabulary"):
        prefiller.prefill([[1, cfg.vocab_size]])
    with pytest.raises(WaferError, match="exceeds the model's context"):
        prefiller.prefill([[1] * cfg.max_seq_len])
    with pytest.raises(WaferError, match="needs 64 devices"):
        make_core_mesh(Grid(8, 8), Executor.DEVICES)
