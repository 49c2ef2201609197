"""`wafer bench decode` / `bench prefill` sweeps: list parsing and its errors, the computed memory
skip, the JSON's shape, the plot file, and that every point's accounting is the single-point
benchmark's for the same inputs. Wall-clock figures are never asserted."""

import functools
import json

import pytest

from bench import bandwidth, decode, sweep
from bench.decode import attended_positions
from bench.prefill import prefill_flops
from model.config import SMOLLM2_135M, TINY_LLAMA
from model.generate import cache_len_for
from tests.helpers.cli_runner import assert_one_line_error, run_cli

GiB = 2 ** 30
TINY_WEIGHT_BYTES = 119104 * 4  # tests/test_bench_decode.py works it out by hand
SMOLLM2_WEIGHT_BYTES = 538_000_000  # about: the figure only needs to be the right size here


@pytest.fixture
def small_bounds(monkeypatch):
    """Bound measurements small enough for a test (the real sizes defeat the caches), for the
    sweeps and for the single-point benchmark they are compared with (whose bound is not compared)."""
    small = functools.partial(bandwidth.measure_machine, sum_bytes=1 << 20, gemv_rows=256, gemm_n=64, runs=1)
    monkeypatch.setattr(sweep, "measure_machine", small)
    monkeypatch.setattr(decode, "measure_machine", small)
    monkeypatch.setattr(sweep, "matmul_peak_in_fresh_process",
                        functools.partial(bandwidth.measure_matmul_peak, sizes=(64,), runs=1))


@pytest.mark.parametrize("command, argv, fragments", [
    ("decode", ["--batches", ""], ["--batches", "expected comma-separated positive integers"]),
    ("decode", ["--batches", "1,0"], ["--batches", "'1,0'"]),
    ("decode", ["--contexts", "256,8k"], ["--contexts", "'256,8k'"]),
    ("decode", ["--contexts", ","], ["--contexts"]),
    ("decode", ["--batches", "2,2"], ["--batches repeats a value: 2,2"]),
    ("decode", ["--batch", "2", "--batches", "1,2"], ["--batches", "not allowed with argument --batch"]),
    ("decode", ["--context", "8", "--contexts", "8"], ["--contexts", "not allowed with argument --context"]),
    ("decode", ["--batches", "1", "--compare-hf"], ["--compare-hf times one point"]),
    ("decode", ["--batches", "1", "--mesh", "2x2"], ["--mesh times one point"]),
    ("decode", ["--batches", "1", "--layout", "full"], ["--layout needs --mesh"]),
    ("decode", ["--batches", "1", "--steps", "0"], ["--steps", "positive"]),
    ("decode", ["--plot", "curves.txt"], ["--plot curves.txt", ".png"]),
    ("prefill", ["--prompt-lens", "128,x"], ["--prompt-lens", "'128,x'"]),
    ("prefill", ["--prompt-lens", "0"], ["--prompt-lens"]),
    ("prefill", ["--batches", "1,4,1"], ["--batches repeats a value"]),
    ("prefill", ["--prompt-len", "8", "--prompt-lens", "8"], ["not allowed with argument --prompt-len"]),
    ("prefill", ["--prompt-lens", "8", "--compare-hf"], ["--compare-hf times one point"]),
    ("prefill", ["--prompt-lens", "8", "--plot", "/proc/no/such.png"], ["--plot /proc/no/such.png"]),
])
def test_bad_sweeps_are_one_line(capsys, command, argv, fragments):
    rc, out, err = run_cli(capsys, "bench", command, *argv)
    assert out == ""
    assert_one_line_error(rc, err, *fragments)


def test_decode_point_bytes_by_hand():
    # TINY_LLAMA caches 512 bytes per token (float32). Context 8, 4 steps: 64 positions, one chunk
    # that holds all of them (no copy), so weights + 3 * 64 * 512.
    assert cache_len_for(8, 5) == 64
    assert sweep.decode_point_bytes(TINY_LLAMA, 1000, 4, 3, 8, 4) == 1000 + 3 * 64 * 512
    assert sweep.decode_point_bytes(TINY_LLAMA, 1000, 2, 3, 8, 4) == 1000 + 3 * 64 * 256  # 16-bit halves it
    # SmolLM2 (45 KiB per token in float32): 64 sequences at 8K are far beyond a 24 GiB machine,
    # one sequence at 256 far within it; 64 x 8K in bfloat16 is still too big.
    big = sweep.decode_point_bytes(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 64, 8000, 16)
    assert big == SMOLLM2_WEIGHT_BYTES + 64 * 8064 * 46080 and big > 22 * GiB
    assert sweep.decode_point_bytes(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 2, 64, 8000, 16) > 11 * GiB
    assert sweep.decode_point_bytes(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 1, 256, 16) < 1 * GiB
    # Many steps from a short context grow the cache chunk by chunk: a copy beside the original.
    S = cache_len_for(100, 2001)
    assert sweep.decode_point_bytes(TINY_LLAMA, 0, 4, 1, 100, 2000) == 2 * S * 512


def test_skip_reasons():
    reason = sweep.decode_skip_reason(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 64, 8000, 16, budget=18 * GiB)
    assert reason.startswith("needs 22.") and "64 x 8064 positions" in reason and "budget 18.0 GiB" in reason
    assert sweep.decode_skip_reason(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 1, 256, 16, budget=18 * GiB) is None
    assert "exceeds the model's context of 8192" in sweep.decode_skip_reason(
        SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 1, 8192, 16, budget=18 * GiB)
    need = sweep.prefill_point_bytes(SMOLLM2_135M, SMOLLM2_WEIGHT_BYTES, 4, 256, 8000, 2048)
    assert need > 18 * GiB and sweep.prefill_skip_reason(SMOLLM2_135M, need, 8000, 18 * GiB).startswith("needs")
    assert sweep.prefill_skip_reason(SMOLLM2_135M, 10, 8192, 18 * GiB).startswith("prompt of 8192 leaves no room")
    assert 0 < sweep.memory_budget() < sweep.machine_memory_bytes()


def _single(capsys, *argv) -> dict:
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_decode_sweep_json_plot_and_single_point_agreement(capsys, tiny_checkpoint, small_bounds, monkeypatch,
                                                           tmp_path):
    # A budget between the two batches' needs at context 16: batch 4 is skipped, batch 1 runs.
    need = lambda b: sweep.decode_point_bytes(TINY_LLAMA, TINY_WEIGHT_BYTES, 4, b, 16, 3)
    monkeypatch.setattr(sweep, "memory_budget", lambda: (need(1) + need(4)) // 2)
    plot = tmp_path / "decode" / "scaling.png"
    rc, out, err = run_cli(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batches", "1,4",
                           "--contexts", "16,253", "--steps", "3", "--repeats", "1", "--plot", str(plot), "--json")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1 and "4/4" in err, "stdout is the JSON alone; the bar is on stderr"
    r = json.loads(out)
    assert (r["kind"], r["steps"], r["repeats"]) == ("decode_sweep", 3, 1)
    assert r["bandwidth_gbs"] == max(r["bandwidth_candidates"].values()) > 0
    assert r["env"]["loadavg_1m_start"] >= 0
    assert [(p["batch"], p["context"]) for p in r["points"]] == [(1, 16), (4, 16), (1, 253), (4, 253)]
    ran, skipped = r["points"][0], r["points"][1:]
    assert ran["skipped"] is None and ran["tok_per_s"] > 0 and len(ran["tok_per_s_runs"]) == 1
    assert skipped[0]["skipped"].startswith("needs") and skipped[0]["memory_bytes"] == need(4)
    assert all("exceeds the model's context of 256" in p["skipped"] for p in skipped[1:])
    # The point's accounting is the single-point benchmark's for the same inputs...
    single = _single(capsys, "bench", "decode", "--checkpoint", tiny_checkpoint, "--batch", "1", "--context", "16",
                     "--steps", "3", "--repeats", "1")
    for key in ("weight_bytes", "kv_bytes_per_step", "bytes_per_step", "cache_len", "valid_positions",
                "attended_positions", "flops_per_step", "steps", "repeats"):
        assert ran[key] == single[key], key
    assert ran["attended_positions"] == round(attended_positions(16, 3), 1)
    # ... against the one bound of the run.
    assert ran["roofline_tok_per_s"] == pytest.approx(r["bandwidth_gbs"] * 1e9 / ran["bytes_per_step"], rel=1e-3)
    assert ran["roofline_fraction"] == pytest.approx(ran["tok_per_s"] / ran["roofline_tok_per_s"], rel=1e-2, abs=1e-4)
    assert r["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each point's line reached stderr as it was measured, in order.
    lines = [line for line in err.splitlines() if line.startswith("batch ")]
    assert lines == [sweep.format_decode_point(p) for p in r["points"]]


def test_sweep_tables():
    # The table of a report: a header, one row per point (skipped ones with their reason), env.
    env = {"jax": "0", "device_count": 1, "device_kind": "cpu", "cpu_count": 2, "cpu_model": "x"}
    ran = {"batch": 2, "context": 8, "skipped": None, "tok_per_s": 10.0, "tok_per_s_aggregate": 20.0,
           "bytes_per_step": 2e6, "roofline_tok_per_s": 40.0, "roofline_fraction": 0.25}
    decode = {"model": "m", "dtype": "float32", "steps": 2, "repeats": 1, "cache": "filled", "bandwidth_gbs": 1.0,
              "bandwidth_source": "jax_sum", "memory_budget_bytes": GiB, "env": env,
              "points": [ran, {"batch": 2, "context": 254, "skipped": "context 254 + 2 steps + 1 exceeds"}]}
    lines = sweep.format_decode_sweep(decode).splitlines()
    assert "2 steps x 1 timed runs per point" in lines[0] and "measured once for every point" in lines[1]
    assert lines[2].split()[:2] == ["batch", "context"] and lines[-1].startswith("env")
    assert lines[4].split() == ["2", "8", "10.0", "20.0", "2.0", "40.0", "0.25"]
    assert lines[5].split()[:3] == ["2", "254", "-"] and "skipped: context 254 + 2 steps" in lines[5]
    prefill = {"model": "m", "dtype": "float32", "mesh": "1x1", "executor": "devices", "repeats": 1, "chunk": 2048,
               "matmul_peak_gflops": 100.0, "matmul_peak_source": "numpy_gemm", "memory_budget_bytes": GiB,
               "env": env, "points": [{"batch": 1, "prompt_len": 16, "skipped": None, "tok_per_s": 50.0,
                                       "flops": 3e9, "achieved_gflops": 25.0, "mfu": 0.25}]}
    lines = sweep.format_prefill_sweep(prefill).splitlines()
    assert "matmul peak 100 GFLOP/s" in lines[1] and lines[4].split() == ["1", "16", "50", "3.0", "25.0", "0.250"]
    # The line a sweep writes per point as soon as it is measured.
    assert sweep.format_decode_point(ran) == ("batch 2, context 8: 10.0 tok/s a sequence (20.0 in all), "
                                              "0.25 of the bound")
    assert sweep.format_decode_point(decode["points"][1]) == ("batch 2, context 254: skipped (context 254 + 2 "
                                                              "steps + 1 exceeds)")
    assert sweep.format_prefill_point(prefill["points"][0]) == ("batch 1, prompt 16: 50 tok/s, 25.0 GFLOP/s, "
                                                                "MFU 0.250")


def test_prefill_sweep_json_plot_and_single_point_agreement(capsys, tiny_checkpoint, small_bounds, tmp_path):
    plot = tmp_path / "prefill.png"
    r = _single(capsys, "bench", "prefill", "--checkpoint", tiny_checkpoint, "--batches", "2",
                "--prompt-lens", "16,256", "--repeats", "1", "--plot", str(plot))
    assert (r["kind"], r["mesh"], r["repeats"]) == ("prefill_sweep", "1x1", 1)
    assert r["matmul_peak_gflops"] > 0 and r["matmul_peak_source"]
    assert [(p["batch"], p["prompt_len"]) for p in r["points"]] == [(2, 16), (2, 256)]
    assert "leaves no room in the model's context of 256" in r["points"][1]["skipped"]
    # The single-point benchmark's accounting (its `flops` is `prefill_flops`), against the run's peak.
    p = r["points"][0]
    assert p["skipped"] is None and p["tok_per_s"] > 0 and len(p["tok_per_s_runs"]) == 1
    assert p["flops"] == prefill_flops(TINY_LLAMA, [16, 16])
    assert p["achieved_gflops"] == pytest.approx(p["flops"] / p["prefill_s"] / 1e9, rel=1e-2, abs=0.1)
    assert p["mfu"] == pytest.approx(p["achieved_gflops"] / r["matmul_peak_gflops"], rel=2e-2, abs=1e-3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
