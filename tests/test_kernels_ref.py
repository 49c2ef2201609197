"""The single-device reference kernels against independent implementations and hand cases."""

import numpy as np
import pytest
import jax.numpy as jnp

from kernels.attention import gqa_attention_ref
from kernels.rmsnorm import rmsnorm_ref
from kernels.rope import apply_rope_ref, rope_cos_sin, rope_inv_freq
from model.cache import write_kv


def test_rmsnorm_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    want = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5)
    got = np.asarray(rmsnorm_ref(jnp.asarray(x), jnp.asarray(w), 1e-5))
    # float32 statistics against a float64 formula: relative error at float32 rounding level.
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_rope_position_zero_is_identity():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16)
    cos, sin = rope_cos_sin(jnp.zeros((1,), jnp.int32), rope_inv_freq(16, 10000.0))
    np.testing.assert_array_equal(np.asarray(apply_rope_ref(x, cos, sin)), np.asarray(x))


def test_rope_rotates_half_split_pairs():
    # H = 4, theta chosen so inv_freq = [1, 1/100]; at position 1 pair (x0, x2) turns by 1 rad.
    inv = rope_inv_freq(4, 10000.0)
    np.testing.assert_allclose(inv, [1.0, 0.01], rtol=1e-7)
    x = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    cos, sin = rope_cos_sin(jnp.ones((1,), jnp.int32), inv)
    got = np.asarray(apply_rope_ref(x, cos, sin))[0]
    np.testing.assert_allclose(got, [np.cos(1.0), 0.0, np.sin(1.0), 0.0], atol=1e-7)


def test_rope_preserves_norm():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((7, 64)), jnp.float32)
    cos, sin = rope_cos_sin(jnp.arange(7) * 131, rope_inv_freq(64, 500000.0))
    y = apply_rope_ref(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rope_inv_freq_matches_transformers(rope_type):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": 500000.0}
    scaling = None
    if rope_type == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
        scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_pos=64)
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=params, max_position_embeddings=4096)
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        want = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0].numpy()
    else:
        want = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].numpy()
    got = rope_inv_freq(128, 500000.0, scaling)
    # The same float32 operations in the same order: bit-identical frequencies.
    np.testing.assert_array_equal(got, want)
    if rope_type == "llama3":  # the scaling must actually change something at these sizes
        assert not np.allclose(got, rope_inv_freq(128, 500000.0))


def _attention_loop(q, k, v, visible):
    """Per-(batch, query, head) softmax in float64: the obvious, slow definition."""
    B, T, N, H = q.shape
    K = k.shape[1]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            for n in range(N):
                kv = n // (N // K)
                s = k[b, kv] @ q[b, t, n] / np.sqrt(H)
                s = np.where(visible[b, t], s, -np.inf)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, kv]
    return out


def test_gqa_attention_matches_loop():
    rng = np.random.default_rng(2)
    B, T, N, K, S, H = 2, 3, 6, 2, 10, 8
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, H)).astype(np.float32)
    visible = np.arange(S)[None, None] <= (np.array([4, 7])[:, None, None] + np.arange(T)[None, :, None])
    got = np.asarray(gqa_attention_ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible)))
    want = _attention_loop(q, k, v, visible)
    # float32 softmax over 10 keys: errors at a few float32 ulps of O(1) outputs.
    assert np.abs(got - want).max() <= 1e-5


def test_attention_single_visible_key_returns_its_value():
    v = jnp.arange(2 * 5 * 4, dtype=jnp.float32).reshape(1, 2, 5, 4)
    k = jnp.ones((1, 2, 5, 4))
    q = jnp.ones((1, 1, 4, 4))
    visible = jnp.zeros((1, 1, 5), bool).at[0, 0, 3].set(True)
    out = np.asarray(gqa_attention_ref(q, k, v, visible))[0, 0]
    for n in range(4):
        np.testing.assert_array_equal(out[n], np.asarray(v)[0, n // 2, 3])


def test_write_kv_places_each_sequence_at_its_offset():
    cache = jnp.zeros((2, 1, 6, 2))
    new = jnp.ones((2, 1, 2, 2)) * jnp.asarray([1.0, 2.0])[:, None, None, None]
    out = np.asarray(write_kv(cache, new, jnp.asarray([0, 3], jnp.int32)))[:, 0, :, 0]
    np.testing.assert_array_equal(out, [[1, 1, 0, 0, 0, 0], [0, 0, 0, 2, 2, 0]])
