"""The single-device decoder's chunks: several steps per compiled program, the cache cut to a
bucket past its filled part. Every chunking must give the tokens of one step per program."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import generate
from model.cache import empty_cache
from model.config import TINY_LLAMA
from model.generate import Generator, attend_len_for, chunk_schedule, resize_cache
from model.sampling import Sampling
from model.weights import init_random_params


@pytest.fixture(scope="module")
def tiny_params():
    return jax.tree.map(jnp.asarray, init_random_params(TINY_LLAMA, seed=3, scale=0.2))


@pytest.fixture
def small_buckets(monkeypatch):
    """Attention buckets of 64 positions, so the tiny model's caches span several."""
    monkeypatch.setattr(generate, "ATTEND_MIN_BUCKET", 64)


def test_attend_len_covers_the_last_position():
    assert attend_len_for(448, 300) == 448  # below the minimum bucket: the whole cache
    S = 8192
    for last in (0, 1023, 1024, 5000, S - 1):
        cut = attend_len_for(S, last)
        assert last < cut <= S and (cut % 1024 == 0 or cut == S)
        assert cut - last <= 1024


def test_chunk_schedule_follows_the_loop():
    # 1 + 37 tokens: 37 steps in chunks of 16, 16, 5.
    schedule = chunk_schedule(4096, 500, 38, 16)
    assert [n for n, _ in schedule] == [16, 16, 5]
    assert [cut for _, cut in schedule] == [attend_len_for(4096, p) for p in (515, 531, 536)]


def test_resize_cache_keeps_the_prefix():
    cache = empty_cache(2, 1, 2, 128, 4)
    cache = dataclasses.replace(cache, k_LBKSH=tuple(k + jnp.arange(128.)[None, None, :, None] for k in cache.k_LBKSH))
    cut = resize_cache(cache, 64)
    assert cut.max_len == 64 and np.array_equal(cut.k_LBKSH[1], cache.k_LBKSH[1][:, :, :64])
    grown = resize_cache(cut, 192)
    assert grown.max_len == 192
    assert np.array_equal(grown.k_LBKSH[0][:, :, :64], cut.k_LBKSH[0]) and not grown.k_LBKSH[0][:, :, 64:].any()


def generate_with_chunks(gen: Generator, chunks, *args, **kwargs):
    """`gen.generate` once per chunk size (one Generator: the prefill compiles once)."""
    runs = []
    for chunk in chunks:
        gen.chunk = chunk
        runs.append(gen.generate(*args, **kwargs))
    return runs


@pytest.mark.parametrize("sampling", [
    Sampling(), pytest.param(Sampling(temperature=0.8, top_k=20, seed=5), marks=pytest.mark.slow)])
def test_chunks_give_the_tokens_of_single_steps(tiny_params, small_buckets, sampling):
    prompts = [[5, 9, 200, 31, 7, 8, 100, 3, 4, 11], [17, 18, 19]]
    # 150 new tokens from a cache of 192: the chunks of 7 cross buckets 64 -> 128 -> 192.
    assert len({cut for _, cut in chunk_schedule(192, 10, 150, 7)}) == 3
    ref, got = generate_with_chunks(Generator(tiny_params, TINY_LLAMA), (1, 7), prompts, 150, sampling,
                                    stop_on_eos=False)
    assert got.decode_steps == ref.decode_steps == 149
    assert got.tokens == ref.tokens


def test_chunks_stop_at_eos_mid_chunk(tiny_params):
    prompts = [[5, 9, 200, 31], [40, 41, 42, 43, 44]]
    free = Generator(tiny_params, TINY_LLAMA, chunk=8).generate(prompts, 40, stop_on_eos=False).tokens
    eos = free[0][9]  # row 0 reaches it at its 10th token, inside the second chunk of 8
    config = dataclasses.replace(TINY_LLAMA, eos_token_ids=(eos,))
    ref, got = generate_with_chunks(Generator(tiny_params, config), (1, 8), prompts, 40)
    assert got.tokens == ref.tokens
    for row, full in zip(got.tokens, free):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:stop]
    assert got.tokens[0][-1] == eos


def test_chunk_must_be_positive(tiny_params):
    with pytest.raises(Exception, match="at least 1 step"):
        Generator(tiny_params, TINY_LLAMA, chunk=0)
