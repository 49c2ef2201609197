"""The CPU kernels (kernels/gemv_cpu.py, kernels/decode_attention_cpu.py) against their
references, where the model uses them, and the fallback to XLA's ops when they cannot be built."""

import concurrent.futures
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_ffi, gemv_cpu
from kernels.decode_attention_cpu import decode_attention_prefix, decode_attention_prefix_ref
from kernels.gemv_cpu import (MAX_ROWS, PANEL, WLayout, gemv, gemv_panels, gemv_ref, matmul_f32, pack_panels,
                              unpack_panels)
from model.config import TINY_LLAMA
from model.generate import Generator
from model.weights import init_random_params

needs_kernel = pytest.mark.skipif(not cpu_ffi.available(), reason="CPU kernels unavailable (see the warning)")
# f32 products of length K against a float64 reference: the error of a float32 dot product grows
# like sqrt(K) * 2^-24 relative to the norm; 1e-5 leaves room for K in the thousands.
REL_TOL = 1e-5


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


# (M, K, N): the model's shapes (SmolLM2: D 576, QKV 960, F 1536, 2F 3072), odd sizes that leave
# every scalar tail (K % 8, K % 4, N % 8, N % 4, M odd) and sizes large enough to be chunked.
# (1, 1037, 2055): the batch-1 `[N, K]` path's blocks of 8 rows of W, then of 4, then single rows,
# each with a K % 8 tail.
SHAPES = [(1, 576, 960), (8, 576, 3072), (1, 1536, 576), (8, 1536, 576), (3, 1537, 1029), (5, 13, 37),
          (MAX_ROWS, 64, 1000), (1, 3, 1), (7, 2053, 515), (1, 1037, 2055)]


@needs_kernel
@pytest.mark.parametrize("layout", list(WLayout))
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemv_matches_reference(M, K, N, layout):
    rng = np.random.default_rng(M * K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w_KN = rng.standard_normal((K, N)).astype(np.float32)
    w = np.ascontiguousarray(w_KN.T) if layout is WLayout.NK else w_KN
    want = x.astype(np.float64) @ w_KN.astype(np.float64)
    got = jax.jit(gemv, static_argnums=(2, 3))(x, w, layout, 2)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    assert rel_err(got, want) < REL_TOL
    assert rel_err(gemv_ref(jnp.asarray(x), jnp.asarray(w), layout), want) < REL_TOL


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_is_deterministic(threads):
    # Chunk partials are summed in chunk order: the same call gives the same bits every time.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1536)).astype(np.float32)
    w = rng.standard_normal((1536, 3072)).astype(np.float32)
    f = jax.jit(lambda x, w: gemv(x, w, threads=threads))
    first = np.asarray(f(x, w))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(f(x, w)), first)
    assert rel_err(first, x.astype(np.float64) @ w) < REL_TOL


@needs_kernel
def test_gemv_from_concurrent_callers():
    # Two computations at once: one gets the pool, the other runs on its own thread; both right.
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((2, 576)).astype(np.float32) for _ in range(8)]
    w = rng.standard_normal((49152 // 8, 576)).astype(np.float32)
    f = jax.jit(lambda x, w: gemv(x, w, WLayout.NK))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: np.asarray(f(x, w)), xs))
    for x, y in zip(xs, outs):
        assert rel_err(y, x.astype(np.float64) @ w.T) < REL_TOL


def custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count(gemv_cpu.TARGET)


@needs_kernel
def test_matmul_f32_takes_the_kernel_only_where_it_applies():
    w = jnp.zeros((64, 48), jnp.float32)
    assert custom_calls(matmul_f32, jnp.zeros((2, 1, 64), jnp.float32), w) == 1  # decode rows
    assert custom_calls(lambda x, w: matmul_f32(x, w, WLayout.NK), jnp.zeros((3, 48), jnp.float32), w) == 1
    assert custom_calls(matmul_f32, jnp.zeros((MAX_ROWS + 1, 64), jnp.float32), w) == 0  # prefill-sized
    assert custom_calls(matmul_f32, jnp.zeros((1, 64), jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 1, 64)), jnp.float32)
    wr = jnp.asarray(np.random.default_rng(3).standard_normal((64, 48)), jnp.float32)
    got = matmul_f32(x, wr)
    assert got.shape == (2, 1, 48)
    assert rel_err(got, np.asarray(x, np.float64) @ np.asarray(wr, np.float64)) < REL_TOL


# (K, N) for the panel kernel: a model shape large enough to be cut into chunks of panels, odd K,
# N with a padded last panel (N % 8 = 1, 3, 7), fewer panels than one block of C, one panel.
PANEL_SHAPES = [(576, 3072), (1537, 1029), (13, 37), (3, 1), (64, 8), (7, 23), (2053, 515)]


@needs_kernel
@pytest.mark.parametrize("K,N", PANEL_SHAPES)
def test_gemv_panels_matches_reference(K, N):
    # Every row count the decode path sends (1..16: row groups of 8 and each remainder 1-7, whose
    # blocks of C panels leave 0..C-1 panels over), on two threads, against float64.
    rng = np.random.default_rng(K + N)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w_PKC = pack_panels(w)
    assert w_PKC.shape == (-(-N // PANEL), K, PANEL)
    np.testing.assert_array_equal(np.asarray(unpack_panels(jnp.asarray(w_PKC), N)), w)
    for M in range(1, MAX_ROWS + 1):
        x = rng.standard_normal((M, K)).astype(np.float32)
        got = gemv_panels(jnp.asarray(x), jnp.asarray(w_PKC), N, threads=2)
        assert got.shape == (M, N) and got.dtype == jnp.float32
        assert rel_err(got, x.astype(np.float64) @ w.astype(np.float64)) < REL_TOL, M


@needs_kernel
@pytest.mark.parametrize("K,N", [(576, 960), (1536, 576), (37, 64)])
def test_gemv_panels_same_bits_as_kn_kernel_on_one_thread(K, N):
    # Each output is one FMA chain in k order from zero, as in the [K, N] kernel without chunk
    # partials (one thread): the same bits, for any thread count of the panel kernel.
    rng = np.random.default_rng(K * N)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w_PKC = jnp.asarray(pack_panels(w))
    for M in range(1, MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((M, K)).astype(np.float32))
        want = np.asarray(gemv(x, jnp.asarray(w), threads=1))
        for threads in (1, 2, 3):
            np.testing.assert_array_equal(np.asarray(gemv_panels(x, w_PKC, threads=threads)), want)


@needs_kernel
def test_matmul_f32_takes_the_panel_kernel_for_packed_weights():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w_PKC = jnp.asarray(pack_panels(w))
    count = lambda x: jax.jit(matmul_f32).lower(x, w_PKC).as_text().count(gemv_cpu.PANELS_TARGET)
    assert count(jnp.zeros((2, 1, 64), jnp.float32)) == 1  # decode rows
    assert count(jnp.zeros((MAX_ROWS + 1, 64), jnp.float32)) == 0  # prefill-sized: XLA's dot, unpacked
    for shape in [(2, 1, 64), (MAX_ROWS + 1, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = matmul_f32(jnp.asarray(x), w_PKC)
        assert got.shape == shape[:-1] + (48,)
        assert rel_err(got, x.astype(np.float64) @ w.astype(np.float64)) < REL_TOL


@needs_kernel
def test_generator_with_panels_gives_the_same_greedy_tokens():
    params = init_random_params(TINY_LLAMA, seed=3, scale=0.2)
    plain, packed = Generator(params, TINY_LLAMA, panels=False), Generator(params, TINY_LLAMA, panels=True)
    assert packed.panels and packed.params["layers"][0]["w_qkv"].ndim == 3
    assert plain.params["layers"][0]["w_qkv"].ndim == 2
    prompts = [[1, 5, 9], [7, 3, 2, 8, 4], [11], [6, 6, 6, 6]]  # batch 4: prefill and decode rows
    assert packed.generate(prompts, 12, stop_on_eos=False).tokens == plain.generate(
        prompts, 12, stop_on_eos=False).tokens


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "false"])
def test_a_failed_build_gives_a_reason_not_an_exception(cxx, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("WAFER_CACHE_DIR", str(tmp_path))  # nothing cached: the build must run
    monkeypatch.delenv("WAFER_CPU_KERNELS", raising=False)
    reason = cpu_ffi.unavailable_reason()
    assert reason is not None and reason.startswith("build failed")
    assert not list(tmp_path.rglob("*.so"))


def test_unavailable_kernel_warns_once_and_matmul_is_xla(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_ffi, "unavailable_reason", lambda: "build failed: no compiler")
    cpu_ffi.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_ffi.__name__):
            for _ in range(3):
                assert not cpu_ffi.available()
            assert custom_calls(matmul_f32, jnp.zeros((1, 64), jnp.float32), jnp.zeros((64, 8), jnp.float32)) == 0
            assert cpu_ffi.why_off() == "build failed: no compiler"  # what `bench decode` reports
        assert [r.getMessage() for r in caplog.records] == [
            "CPU kernels off, XLA's ops used instead: build failed: no compiler"]
    finally:
        cpu_ffi.available.cache_clear()


@needs_kernel
@pytest.mark.parametrize("B,K,G,S,H,n", [
    (1, 3, 3, 512, 64, [257]),  # SmolLM2 at context 256
    (8, 3, 3, 512, 64, [1, 8, 9, 100, 257, 511, 512, 300]),  # every exp tail, the whole cache
    (2, 2, 4, 64, 128, [17, 64]),  # G > 3: blocks of 3 and a tail of 1
    (1, 1, 2, 40, 32, [33]),
])
def test_decode_attention_matches_reference(B, K, G, S, H, n):
    rng = np.random.default_rng(B * S + G)
    q = jnp.asarray(rng.standard_normal((B, K, G, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float32)
    n_B = jnp.asarray(n, jnp.int32)
    attend = jax.jit(decode_attention_prefix)
    got = attend(q, k, v, n_B)
    assert attend.lower(q, k, v, n_B).as_text().count("wafer_decode_attention_f32") == 1
    # float64 softmax over the visible prefix, written out independently.
    qd, kd, vd = (np.asarray(a, np.float64) for a in (q, k, v))
    want = np.zeros((B, K, G, H))
    for b in range(B):
        s = np.einsum("kgh,ksh->kgs", qd[b], kd[b, :, :n[b]]) / np.sqrt(H)
        p = np.exp(s - s.max(-1, keepdims=True))
        want[b] = np.einsum("kgs,ksh->kgh", p / p.sum(-1, keepdims=True), vd[b, :, :n[b]])
    # Softmax-weighted sums of n float32 products; 1e-5 relative norm as for the GEMV.
    assert rel_err(got, want) < REL_TOL
    assert rel_err(jax.jit(decode_attention_prefix_ref)(q, k, v, n_B), want) < REL_TOL
    # Positions past the prefix are never read: changing them changes nothing, bit for bit.
    k2 = k.at[:, :, max(n):].set(1e30) if max(n) < S else k
    np.testing.assert_array_equal(np.asarray(attend(q, k2, v, n_B)), np.asarray(got))


def test_decode_attention_falls_back_for_16_bit_caches():
    q = jnp.ones((1, 1, 1, 64), jnp.bfloat16)
    k = jnp.ones((1, 1, 8, 64), jnp.bfloat16)
    lowered = jax.jit(decode_attention_prefix).lower(q, k, k, jnp.ones((1,), jnp.int32)).as_text()
    assert "wafer_decode_attention_f32" not in lowered
