"""`wafer bench decode`: byte and FLOP accounting, argument errors, and a smoke run on a tiny checkpoint.

Wall-clock figures are never asserted (benchmarks are commands, not tests); only their structure
and the arithmetic that ties them together.
"""

import functools
import json
import sys
import types

import pytest

from bench import bandwidth, decode
from model.config import TINY_LLAMA, TINY_QWEN2
from model.weights import init_random_params, weight_bytes
from tests.helpers.cli_runner import run_cli

# Bound measurements small enough for a test; the real sizes defeat the caches.
SMALL_MACHINE = functools.partial(bandwidth.measure_machine, sum_bytes=1 << 20, gemv_rows=256, gemm_n=64, runs=1)


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setattr(decode, "measure_machine", SMALL_MACHINE)


def test_weight_bytes_by_hand():
    # TINY_LLAMA: D 64, F 160, N 4, K 2, H 16, L 2, V 512, untied head.
    # layer: norms 2*64, w_qkv 64*(4+2*2)*16 = 8192, w_o 64*64 = 4096, w_gate_up 64*320 = 20480,
    # w_down 160*64 = 10240 -> 43136; two layers + final norm 64 + head 512*64 = 119104 floats.
    assert weight_bytes(init_random_params(TINY_LLAMA)) == 119104 * 4
    # TINY_QWEN2 adds b_qkv (128 per layer) and ties the head: the embedding counts once.
    assert weight_bytes(init_random_params(TINY_QWEN2)) == (119104 + 2 * 128) * 4


def test_kv_bytes_by_hand():
    # Context 10, 4 steps: the steps attend to 11, 12, 13, 14 positions, mean 12.5.
    assert decode.mean_valid_len(10, 4) == 12.5
    assert decode.mean_valid_len(256, 128) == 320.5
    # One token of K and V over both layers: 2 * 2 layers * 2 heads * 16 * 4 bytes = 512.
    assert TINY_LLAMA.kv_bytes_per_token(4) == 512
    assert decode.kv_bytes_per_step(TINY_LLAMA, batch=3, context=10, steps=4) == 3 * 12.5 * 512


def test_flops_by_hand():
    params = init_random_params(TINY_LLAMA)
    # Matrices: 2 * (8192 + 4096 + 20480 + 10240) + head 32768 = 118784 weights.
    assert decode.matmul_params(params) == 118784
    # Attention: 4 FLOPs per (layer, head, head dim, attended position) = 4 * 2 * 4 * 16 * 12.5.
    assert decode.flops_per_step(params, TINY_LLAMA, 1, 10, 4) == 2 * 118784 + 6400
    assert decode.flops_per_step(params, TINY_LLAMA, 8, 10, 4) == 8 * (2 * 118784 + 6400)


def test_generator_cache_len():
    from model.generate import cache_len_for

    # The generator pads the prompt to 32 and the cache to 64: 256 + 129 -> 448.
    assert cache_len_for(256, 128 + 1) == 448
    assert cache_len_for(8, 4 + 1) == 64


def test_random_prompts():
    prompts = decode.random_prompts(4, 32, 49152, seed=3)
    assert len(prompts) == 4 and all(len(p) == 32 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 4, "each batch row gets its own prompt"
    assert all(100 <= t < 49152 - 100 for p in prompts for t in p)
    assert prompts == decode.random_prompts(4, 32, 49152, seed=3)
    assert prompts != decode.random_prompts(4, 32, 49152, seed=4)


def test_machine_bounds_pick_the_best_candidate():
    bounds = SMALL_MACHINE()
    names = [r.name for r in bounds.bandwidth]
    assert names == ["jax_sum", "jax_gemv", "numpy_sum", "numpy_gemv"]
    assert all(r.per_s > 0 for r in bounds.bandwidth)
    assert bounds.bandwidth_bytes_per_s == max(r.per_s for r in bounds.bandwidth)
    assert bounds.matmul.amount == 2 * 64 ** 3 and bounds.matmul_flops_per_s > 0


def test_best_with_keeps_each_candidates_faster_run():
    R = bandwidth.Rate
    a = bandwidth.MachineBounds((R("jax_sum", 100, 2.0), R("jax_gemv", 100, 4.0)), R("jax_gemm", 10, 1.0))
    b = bandwidth.MachineBounds((R("jax_sum", 100, 5.0), R("jax_gemv", 100, 1.0)), R("jax_gemm", 10, 2.0))
    best = a.best_with(b)
    assert [r.seconds for r in best.bandwidth] == [2.0, 1.0]
    assert best.best_bandwidth.name == "jax_gemv" and best.bandwidth_bytes_per_s == 100.0
    assert best.matmul.seconds == 1.0


@pytest.mark.parametrize("argv, fragments", [
    (["--batch", "0"], ["--batch", "must be a positive integer, got 0"]),
    (["--steps", "-3"], ["--steps", "must be a positive integer"]),
    (["--context", "ten"], ["--context", "invalid int value"]),
    (["--repeats", "0"], ["--repeats", "positive"]),
    (["--seed", "-1"], ["--seed", "must be >= 0"]),
    (["--model", "llama3-8b"], ["no embedded weights"]),
    (["--model", "nope"], ["unknown model preset 'nope'"]),
    (["--checkpoint", "/no/such/folder"], ["checkpoint not found"]),
])
def test_bad_arguments_are_one_line(capsys, argv, fragments):
    rc, out, err = run_cli(capsys, "bench", "decode", *argv)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wafer: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_context_must_fit(capsys, tiny_checkpoint, small_machine):
    # 200 + 55 + 1 = 256 fits exactly; one more step does not.
    rc, _, err = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint,
                         "--context", "200", "--steps", "56")
    assert rc == 2
    assert err.strip().splitlines() == [
        "wafer: error: --context 200 + --steps 56 + 1 exceeds the model's context of 256"]


def test_json_smoke(capsys, tiny_checkpoint, small_machine):
    rc, out, err = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batch", "2",
                           "--context", "8", "--steps", "4", "--repeats", "2", "--json")
    assert rc == 0
    assert len(out.strip().splitlines()) == 1, "stdout is the JSON object alone"
    assert "measuring bandwidth" in err
    r = json.loads(out)
    assert (r["batch"], r["context"], r["steps"], r["repeats"]) == (2, 8, 4, 2)
    assert len(r["tok_per_s_runs"]) == 2 and r["tok_per_s"] > 0
    assert r["tok_per_s_aggregate"] == pytest.approx(2 * r["tok_per_s"], abs=0.02)
    # Hand-checked bytes: weights 119104 floats; KV 2 rows * (8 + 5/2) positions * 512 bytes.
    assert r["weight_bytes"] == 119104 * 4
    assert r["kv_bytes_per_step"] == 2 * 10.5 * 512
    assert r["bytes_per_step"] == r["weight_bytes"] + r["kv_bytes_per_step"]
    assert r["bandwidth_gbs"] == max(r["bandwidth_candidates"].values())
    assert r["bandwidth_candidates"][r["bandwidth_source"]] == r["bandwidth_gbs"]
    assert r["roofline_tok_per_s"] == pytest.approx(r["bandwidth_gbs"] * 1e9 / r["bytes_per_step"], rel=1e-3)
    assert r["roofline_fraction"] == pytest.approx(r["tok_per_s"] / r["roofline_tok_per_s"], rel=1e-2, abs=1e-4)
    assert r["cache_len"] == 64
    assert "hf_tok_per_s" not in r
    # Which kernels ran: the project's CPU kernels where they build here, else XLA's and why.
    from kernels import cpu_ffi
    assert r["kernels"] == ("cpu kernels" if cpu_ffi.available() else f"xla ({cpu_ffi.why_off()})")
    env = r["env"]
    assert env["device_count"] >= 1 and env["cpu_count"] >= 1 and env["jax"]
    assert "torch" not in env
    assert env["loadavg_1m_start"] >= 0 and env["loadavg_1m_end"] >= 0


def test_compare_hf_table(capsys, tiny_checkpoint, small_machine):
    rc, out, err = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batch", "1",
                           "--context", "8", "--steps", "6", "--repeats", "1", "--compare-hf")
    assert rc == 0
    labels = [line.split("  ")[0] for line in out.strip().splitlines()]
    assert labels == ["model", "ours", "kernels", "bandwidth", "bytes/step", "roofline", "compute roof", "HF generate", "env"]
    assert "loading HF reference" in err and "loading HF reference" not in out
    # Same weights, same prompt, greedy: the 7 tokens (first + 6 steps) agree with HF's.
    assert "first 7 tokens match" in out
    assert "torch" in out


def test_mesh_json(capsys, tiny_checkpoint, small_machine):
    rc, out, _ = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batch", "2",
                         "--context", "8", "--steps", "4", "--repeats", "1", "--mesh", "2x2",
                         "--schedule", "ktree", "--layout", "full", "--json")
    assert rc == 0
    r = json.loads(out)
    m = r["mesh"]
    assert (m["grid"], m["cores"], m["executor"], m["schedule"]) == ("2x2", 4, "devices", "ktree")
    assert m["tokens_match_single"] is True
    # --layout full on 2 columns: each head's 16 dims split over one segment of both columns.
    assert (m["layout"], m["layout_mode"], m["head_segment"]) == ("full", "full", 2)
    assert m["vs_single_step"] == pytest.approx(m["step_ms"] / m["single_step_ms"], rel=1e-2)
    assert m["sram_per_core_total"] == sum(m["sram_per_core_bytes"].values())
    assert m["sram_per_core_bytes"]["weight"] > 0 and m["sram_per_core_bytes"]["kv"] > 0


def test_mesh_table_rows(capsys, tiny_checkpoint, small_machine):
    rc, out, _ = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--context", "8",
                         "--steps", "3", "--repeats", "1", "--mesh", "4x4", "--executor", "vcores",
                         "--schedule", "psum")  # auto's choice is measured: tests/test_schedule_choice.py
    assert rc == 0
    labels = [line.split("  ")[0] for line in out.strip().splitlines()]
    assert labels[-3:] == ["mesh", "SRAM/core", "env"]
    assert "4x4 vcores psum" in out and "match the 1x1 decoder" in out


def test_compare_llamacpp_missing_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    rc, out, err = run_cli(capsys, "bench", "decode", "--compare-llamacpp")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "wafer: error: --compare-llamacpp needs llama-cpp-python: pip install -e '.[peers]'"]


def test_compare_llamacpp_is_batch_one(capsys, monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    rc, _, err = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batch", "2",
                         "--context", "8", "--steps", "4", "--compare-llamacpp")
    assert rc == 2
    assert err.strip().splitlines() == ["wafer: error: --compare-llamacpp decodes one sequence; use --batch 1 (got 2)"]


@pytest.mark.slow
def test_llamacpp_f32_decodes_our_tokens(smollm2, tmp_path):
    """llama.cpp on its own f32 conversion of the GGUF greedily decodes the tokens we decode."""
    pytest.importorskip("llama_cpp")
    from bench.llamacpp_peer import converted_gguf, time_llamacpp
    from model.generate import Generator

    prompt = decode.random_prompts(1, 64, smollm2.config.vocab_size, 0)
    path = converted_gguf(smollm2.source, "f32", str(tmp_path))
    assert converted_gguf(smollm2.source, "f32", str(tmp_path)) == path  # cached
    peer = time_llamacpp(path, "f32", prompt[0], 15, 1, 2)
    ours = Generator(smollm2.params, smollm2.config).generate(prompt, 16, stop_on_eos=False).tokens[0]
    assert peer.tokens == ours and peer.tok_per_s > 0


def test_kernel_path_names_the_panels_and_why_xla(monkeypatch):
    from types import SimpleNamespace

    from bench.decode import kernel_path
    from kernels import cpu_ffi
    monkeypatch.setattr(cpu_ffi, "available", lambda: True)
    assert kernel_path(SimpleNamespace(panels=True)) == "cpu kernels, panels"
    assert kernel_path(SimpleNamespace(panels=False)) == "cpu kernels"
    monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    monkeypatch.setattr(cpu_ffi, "why_off", lambda: "this CPU lacks AVX2 or FMA")
    assert kernel_path(SimpleNamespace(panels=False)) == "xla (this CPU lacks AVX2 or FMA)"
