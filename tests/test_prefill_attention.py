"""Blocked causal prefill attention against the plain reference, and its memory growth."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels.attention import gqa_attention_ref
from kernels.prefill_attention import blocked_causal_attention


def visible_mask(T, S, q_start, kv_len):
    """[B, T, S] bool written out from the rule, loop by loop, independent of the kernel."""
    vis = np.zeros((len(q_start), T, S), bool)
    for b in range(len(q_start)):
        for t in range(T):
            for s in range(S):
                vis[b, t, s] = s <= q_start[b] + t and s < kv_len[b]
    return vis


def rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


CASES = [
    # B, T, S, N, K, q_start, kv_len, q_block, kv_block
    (1, 37, 37, 2, 2, [0], [37], 16, 16),                  # G=1, T, S not block multiples
    (3, 50, 50, 6, 2, [0, 0, 0], [50, 7, 23], 16, 8),      # G=3, mixed prompt lengths
    (2, 20, 61, 3, 1, [41, 30], [61, 50], 8, 16),           # chunk extending a cache
    (3, 1, 45, 6, 2, [44, 10, 0], [45, 11, 0], 128, 16),    # T=1; b=2 empty: sees no key
    (1, 33, 33, 4, 4, [0], [33], 128, 128),                 # blocks larger than T and S
]


@pytest.mark.parametrize("B,T,S,N,K,q_start,kv_len,q_block,kv_block", CASES)
def test_matches_reference(B, T, S, N, K, q_start, kv_len, q_block, kv_block):
    H = 16
    kq, kk, kv = jax.random.split(jax.random.key(T * 7 + S), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, K, S, H), jnp.float32)
    v = jax.random.normal(kv, (B, K, S, H), jnp.float32)
    vis = visible_mask(T, S, q_start, kv_len)
    fn = jax.jit(functools.partial(blocked_causal_attention, q_block=q_block, kv_block=kv_block))
    got = np.asarray(fn(q, k, v, jnp.asarray(q_start), jnp.asarray(kv_len)))
    assert np.all(np.isfinite(got))
    rows = vis.any(-1)  # [B, T]; rows with nothing visible are padding (the reference gives NaN)
    want = np.asarray(gqa_attention_ref(q, k, v, jnp.asarray(vis)))
    # float32 both ways, only summation order differs: relative-norm error at rounding level.
    assert rel_err(got[rows], want[rows]) < 1e-5
    # padding rows give exact zeros, not NaN
    np.testing.assert_array_equal(got[~rows], 0.0)


def test_padding_rows_of_short_prompts():
    # Three right-padded prompts of lengths 5, 40, 17 in a T = S = 40 batch.
    B, T, N, K, H = 3, 40, 4, 2, 8
    lens = [5, 40, 17]
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key, shape in
               zip(jax.random.split(jax.random.key(1), 3), [(B, T, N, H), (B, K, T, H), (B, K, T, H)]))
    got = np.asarray(blocked_causal_attention(q, k, v, jnp.zeros(B, jnp.int32), jnp.asarray(lens),
                                              q_block=16, kv_block=16))
    assert np.all(np.isfinite(got))
    vis = visible_mask(T, T, [0, 0, 0], lens)
    want = np.asarray(gqa_attention_ref(q, k, v, jnp.asarray(vis)))
    for b, n in enumerate(lens):
        # valid rows (t < length) see keys 0..t; float32 rounding level
        assert rel_err(got[b, :n], want[b, :n]) < 1e-5
    # Padding rows t >= length still see the prompt's keys (s < length <= t) under the rule,
    # so they are finite averages, not zeros; only their finiteness matters to the caller.
    assert np.all(np.isfinite(got[0, 5:]))


def test_hand_case_one_key_visible():
    # Query 0 at position 0 sees only key 0: output is exactly v[0], whatever the scores.
    q = jnp.ones((1, 3, 1, 4), jnp.float32)
    k = jnp.arange(12, dtype=jnp.float32).reshape(1, 1, 3, 4)
    v = jnp.asarray([[[[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]]])
    got = blocked_causal_attention(q, k, v, jnp.asarray([0]), jnp.asarray([3]), q_block=1, kv_block=1)
    np.testing.assert_allclose(np.asarray(got[0, 0, 0]), [1.0, 2, 3, 4], rtol=1e-6)


def temp_bytes(fn, T, H=64):
    q = jax.ShapeDtypeStruct((1, T, 1, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 1, T, H), jnp.float32)
    lens = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.jit(fn).lower(q, kv, kv, lens, lens).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_linear_in_length():
    # Compile only: T = S = 1024 and 4096, B = N = K = 1, H = 64, blocks of 256.
    blocked = functools.partial(blocked_causal_attention, q_block=256, kv_block=256)
    small, large = temp_bytes(blocked, 1024), temp_bytes(blocked, 4096)
    print(f"blocked temp bytes: T=1024 {small}, T=4096 {large}, ratio {large / small:.2f}")
    # Linear would be 4x, quadratic 16x; 6x leaves room for fixed per-block buffers.
    assert 0 < large < 6 * small

    def reference(q, k, v, q_start, kv_len):
        T, S = q.shape[1], k.shape[2]
        s = jnp.arange(S)
        vis = (s[None, None, :] <= q_start[:, None, None] + jnp.arange(T)[None, :, None]) \
            & (s[None, None, :] < kv_len[:, None, None])
        return gqa_attention_ref(q, k, v, vis)

    ref_small, ref_large = temp_bytes(reference, 1024), temp_bytes(reference, 4096)
    print(f"reference temp bytes: T=1024 {ref_small}, T=4096 {ref_large}, ratio {ref_large / ref_small:.2f}")
    # The reference holds the full [T, S] scores: it grows ~16x, which is what the kernel avoids.
    assert ref_large > 12 * ref_small
