"""`wafer bench prefill`: FLOP accounting by hand, argument errors, and smoke runs on a tiny checkpoint.

Wall-clock figures are never asserted; only the structure and the arithmetic that ties them together.
"""

import functools
import json

import pytest

from bench import bandwidth
from bench import prefill as prefill_bench
from model.config import SMOLLM2_135M, TINY_LLAMA
from tests.helpers.cli_runner import run_cli


@pytest.fixture
def small_peak(monkeypatch):
    monkeypatch.setattr(prefill_bench, "matmul_peak_in_fresh_process",
                        functools.partial(bandwidth.measure_matmul_peak, sizes=(64, 128), runs=1))


def test_prefill_flops_by_hand():
    # TINY_LLAMA: D 64, F 160, N 4, K 2, H 16, L 2, V 512.
    # Per token and layer: QKV 64*128 + O 64*64 + gate/up 64*320 + down 160*64 = 43008 weights,
    # 2 FLOPs each, 2 layers: 172032. Attention: 4 * N * H = 256 per (query, key) pair per
    # layer; prompts of 3 and 5 tokens have 6 + 15 causal pairs. LM head 2 * 64 * 512 per prompt.
    expected = 172032 * 8 + 256 * 2 * 21 + 65536 * 2
    assert prefill_bench.prefill_flops(TINY_LLAMA, [3, 5]) == expected
    # SmolLM2 at 8 x 512: 942.8 GFLOP (230 MFLOP per token), the figure RESULTS.md quotes.
    assert prefill_bench.prefill_flops(SMOLLM2_135M, [512] * 8) == pytest.approx(942.8e9, rel=1e-3)


def test_matmul_peak_is_the_best_candidate():
    peak = bandwidth.measure_matmul_peak(sizes=(32, 64), runs=1)
    assert peak.name in {"jax_gemm_32", "jax_gemm_64", "numpy_gemm"}
    assert peak.per_s > 0


@pytest.mark.slow
def test_matmul_peak_in_a_fresh_process():
    peak = bandwidth.matmul_peak_in_fresh_process()
    assert peak.name in {"jax_gemm_2048", "jax_gemm_4096", "numpy_gemm"} and peak.per_s > 1e9


@pytest.mark.parametrize("argv, fragments", [
    (["--batch", "0"], ["--batch", "must be a positive integer, got 0"]),
    (["--prompt-len", "x"], ["--prompt-len", "invalid int value"]),
    (["--mesh", "2y2"], ["mesh '2y2'"]),
    (["--mesh", "8x8"], ["64 are needed"]),  # in-process: JAX already runs with 16 devices
    (["--chunk", "48", "--prompt-len", "40"], ["multiple of 32"]),
    (["--model", "llama3-8b"], ["no embedded weights"]),
])
def test_bad_arguments_are_one_line(capsys, argv, fragments, tiny_checkpoint, small_peak):
    if "--model" not in argv:
        argv = ["--checkpoint", tiny_checkpoint, *argv]
    rc, out, err = run_cli(capsys, "bench", "prefill", *argv)
    assert rc == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if line.startswith("wafer:")]
    assert len(lines) == 1 and all(not line.startswith("Traceback") for line in err.splitlines()), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_prompt_must_fit(capsys, tiny_checkpoint, small_peak):
    rc, _, err = run_cli(capsys, "bench", "prefill", "--checkpoint", tiny_checkpoint, "--prompt-len", "256")
    assert rc == 2
    assert err.strip().splitlines()[-1] == ("wafer: error: --prompt-len 256 leaves no room in the model's "
                                            "context of 256")


def test_json_smoke_on_a_mesh_with_hf(capsys, tiny_checkpoint, small_peak):
    rc, out, err = run_cli(capsys, "bench", "prefill", "--checkpoint", tiny_checkpoint, "--batch", "4",
                           "--prompt-len", "40", "--mesh", "2x2", "--chunk", "32", "--repeats", "2",
                           "--compare-hf", "--json")
    assert rc == 0
    assert len(out.strip().splitlines()) == 1, "stdout is the JSON object alone"
    r = json.loads(out)
    assert (r["batch"], r["prompt_len"], r["mesh"], r["data_parallel"], r["tensor_parallel"]) == (4, 40, "2x2", 2, 2)
    assert len(r["tok_per_s_runs"]) == 2 and r["tok_per_s"] > 0
    assert r["flops"] == prefill_bench.prefill_flops(TINY_LLAMA, [40] * 4)
    assert r["achieved_gflops"] == pytest.approx(r["flops"] / r["prefill_s"] / 1e9, rel=1e-2, abs=0.1)
    assert r["mfu"] == pytest.approx(r["achieved_gflops"] / r["matmul_peak_gflops"], rel=2e-2, abs=1e-3)
    assert r["vs_hf"] == pytest.approx(r["tok_per_s"] / r["hf_tok_per_s"], rel=2e-2)
    assert r["first_tokens_match"] is True  # same weights, same prompts: HF's argmax
    assert r["env"]["torch"] and r["env"]["jax"]


def test_table(capsys, tiny_checkpoint, small_peak):
    rc, out, err = run_cli(capsys, "bench", "prefill", "--checkpoint", tiny_checkpoint, "--batch", "2",
                           "--prompt-len", "16", "--repeats", "1")
    assert rc == 0
    labels = [line.split("  ")[0] for line in out.strip().splitlines()]
    assert labels == ["model", "ours", "FLOPs", "matmul peak", "env"]
    assert "MFU" in out and "measuring the matmul peak" in err
