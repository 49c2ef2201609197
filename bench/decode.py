"""`wafer bench decode`: decode tokens/s against this machine's roofline and against HF transformers.

One run measures everything it reports: the machine's streaming-read bandwidth and matmul peak
(`bench.bandwidth`), our decoder's rate, and optionally HF `generate` on the same weights, prompts
and length. Decode reads every weight once per step whatever the batch, plus each sequence's KV
cache, so the bandwidth roofline in steps/s is

    bandwidth / (weight_bytes + batch * mean valid length * kv_bytes_per_token)

and a step yields one token per sequence. The compute roof (FLOPs per step over the matmul peak)
is printed beside it: with few cores, batching moves decode from one roof to the other.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from typing import Callable

import jax
import numpy as np

from bench.bandwidth import MachineBounds, measure_machine
from bench.decode_mesh import mesh_report, mesh_rows
from bench.mesh_setup import MeshSetup, make_decoder
from bench.table import Row, aligned, env_row
from kernels import cpu_ffi
from mesh.errors import WaferError
from model.config import ModelConfig
from model.generate import DECODE_CHUNK, Generator, cache_len_for, chunk_schedule
from model.load import LoadedModel
from model.weights import Params, lm_head_weight, params_dtype, weight_bytes

# HF's greedy tokens are compared with ours over this many leading tokens of row 0: a sanity
# check that both decoded the same thing (greedy paths may legitimately part later, on near-ties).
MATCH_TOKENS = 16
# Prompt ids stay this far from both ends of the vocabulary, where the special tokens live.
PROMPT_ID_MARGIN = 100


@dataclasses.dataclass(frozen=True)
class DecodeBench:
    """What one run measures: `batch` random prompts (from `seed`) of `context` tokens each, decoded
    for `steps` steps after the first token in each of `repeats` timed runs; HF's generate beside
    ours with `compare_hf`, llama.cpp in float32 and float16 with `compare_llamacpp` (batch 1)."""

    batch: int
    context: int
    steps: int
    repeats: int
    seed: int
    compare_hf: bool
    compare_llamacpp: bool = False


def random_prompts(batch: int, context: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`batch` different prompts of `context` random ids, away from the vocabulary's special ends."""
    margin = PROMPT_ID_MARGIN if vocab_size > 4 * PROMPT_ID_MARGIN else 0
    rng = np.random.default_rng(seed)
    return rng.integers(margin, vocab_size - margin, size=(batch, context)).tolist()


def mean_valid_len(context: int, steps: int) -> float:
    """Mean number of cached positions a decode step attends to (its own new token included).

    The prompt's prefill yields the first token; decode step i (0-based) then writes position
    context + i and attends to positions 0 .. context + i, so context + i + 1 of them.
    """
    return context + (steps + 1) / 2


def attended_positions(context: int, steps: int) -> float:
    """Mean number of cache positions our single-device decode attention reads per step."""
    schedule = chunk_schedule(cache_len_for(context, steps + 1), context, steps + 1, DECODE_CHUNK)
    return sum(n * cut for n, cut in schedule) / steps


def kv_bytes_per_step(config: ModelConfig, batch: int, context: int, steps: int, itemsize: int = 4) -> float:
    """KV bytes one decode step must read, averaged over the steps (a cache of `itemsize`-byte
    elements: 4 in float32, 2 in 16-bit)."""
    return batch * mean_valid_len(context, steps) * config.kv_bytes_per_token(itemsize)


def matmul_params(params: Params) -> int:
    """Weights that take part in a matmul each step: every matrix except the embedding gather."""
    mats = [w for layer in params["layers"] for w in layer.values() if w.ndim == 2]
    return sum(int(w.size) for w in mats) + int(lm_head_weight(params).size)


def flops_per_step(params: Params, config: ModelConfig, batch: int, context: int, steps: int) -> float:
    """FLOPs of one decode step: 2 per weight per sequence, plus QK and PV over the valid cache."""
    attention = 4 * config.n_layers * config.n_heads * config.head_dim * mean_valid_len(context, steps)
    return batch * (2 * matmul_params(params) + attention)


@dataclasses.dataclass
class OursResult:
    tok_per_s: float  # per sequence, median over repeats
    runs_tok_per_s: list[float]
    prefill_ms: float  # median time to first token (prefill + first sample)
    compile_s: float
    tokens_row0: list[int]


def time_ours(decoder, prompts: list[list[int]], steps: int, repeats: int) -> OursResult:
    """Time greedy decoding of `steps` steps after the first token.

    `decoder` has `generate(prompts, max_new_tokens, stop_on_eos=...) -> GenerationResult`.
    """
    # The first call compiles (reported apart) and warms up; the timed calls reuse its code.
    first = decoder.generate(prompts, steps + 1, stop_on_eos=False)
    runs = [decoder.generate(prompts, steps + 1, stop_on_eos=False) for _ in range(repeats)]
    for r in runs:
        if r.decode_steps != steps:
            raise AssertionError(f"the decoder ran {r.decode_steps} decode steps, asked for {steps}")
    return OursResult(
        tok_per_s=statistics.median(r.tok_per_s for r in runs),
        runs_tok_per_s=[r.tok_per_s for r in runs],
        prefill_ms=statistics.median(r.ttft_s for r in runs) * 1e3,
        compile_s=first.compile_s,
        tokens_row0=runs[-1].tokens[0],
    )


@dataclasses.dataclass
class HFResult:
    tok_per_s: float  # per sequence, median over repeats
    runs_tok_per_s: list[float]
    tokens_row0: list[int]
    torch_version: str
    torch_threads: int


def time_hf(source: str, prompts: list[list[int]], steps: int, repeats: int, match_tokens: int,
            dtype: str = "float32") -> HFResult:
    import torch

    from bench.hf_peer import hf_decode_seconds, hf_greedy, load_hf_model

    model = load_hf_model(source, dtype)
    hf_decode_seconds(model, prompts, steps)  # warm-up: allocator, thread pool, lazy init
    runs = [steps / hf_decode_seconds(model, prompts, steps) for _ in range(repeats)]
    tokens = hf_greedy(model, prompts[:1], match_tokens)[0]
    return HFResult(statistics.median(runs), runs, tokens, torch.__version__, torch.get_num_threads())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(hf: HFResult | None, load_start: float | None) -> dict:
    device = jax.devices()[0]
    env = {
        "jax": jax.__version__,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
    }
    if load_start is not None:
        # Other processes on the machine lower every rate here, the bounds included.
        env["loadavg_1m_start"] = load_start
        env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    if hf is not None:
        env["torch"] = hf.torch_version
        env["torch_threads"] = hf.torch_threads
    return env


def kernel_path(generator: Generator) -> str:
    """Which matrix-vector kernels the single-device decoder ran: the project's CPU kernels (with
    the block weights packed into column panels, or not) or XLA's ops, and why XLA's."""
    if jax.default_backend() != "cpu":
        return f"xla ({jax.default_backend()})"
    if not cpu_ffi.available():
        return f"xla ({cpu_ffi.why_off()})"
    return "cpu kernels, panels" if generator.panels else "cpu kernels"


def llamacpp_report(peers: list, ours: OursResult) -> dict:
    """llama.cpp's figures beside ours: per precision its rate, ours over it, and whether its first
    greedy tokens are ours (the f32 file holds our very weights; f16 may part on a near-tie)."""
    report = {"threads": peers[0].threads, "version": peers[0].version}
    for peer in peers:
        n = min(MATCH_TOKENS, len(peer.tokens), len(ours.tokens_row0))
        report[peer.precision] = {
            "tok_per_s": round(peer.tok_per_s, 2),
            "tok_per_s_runs": [round(r, 2) for r in peer.runs_tok_per_s],
            "ours_vs": round(ours.tok_per_s / peer.tok_per_s, 4),
            "tokens_match": peer.tokens[:n] == ours.tokens_row0[:n],
            "tokens_compared": n,
        }
    return report


def build_report(config: ModelConfig, bench: DecodeBench, params: Params, bounds: MachineBounds, ours: OursResult,
                 hf: HFResult | None, env: dict) -> dict:
    """The benchmark's figures as one flat-ish dict (the --json object)."""
    B = bench.batch
    w_bytes = weight_bytes(params)
    kv_bytes = kv_bytes_per_step(config, B, bench.context, bench.steps, params_dtype(params).itemsize)
    step_bytes = w_bytes + kv_bytes
    bw = bounds.bandwidth_bytes_per_s
    roofline = bw / step_bytes  # steps/s = tok/s per sequence
    flops = flops_per_step(params, config, B, bench.context, bench.steps)
    compute_roof = bounds.matmul_flops_per_s / flops
    report = {
        "model": config.name,
        "batch": B,
        "context": bench.context,
        "steps": bench.steps,
        "repeats": bench.repeats,
        "seed": bench.seed,
        "dtype": params_dtype(params).name,
        "tok_per_s": round(ours.tok_per_s, 2),
        "tok_per_s_aggregate": round(ours.tok_per_s * B, 2),
        "tok_per_s_runs": [round(r, 2) for r in ours.runs_tok_per_s],
        "step_ms": round(1e3 / ours.tok_per_s, 3),
        "prefill_ms": round(ours.prefill_ms, 2),
        "compile_s": round(ours.compile_s, 3),
        "bandwidth_gbs": round(bw / 1e9, 2),
        "bandwidth_source": bounds.best_bandwidth.name,
        "bandwidth_candidates": {r.name: round(r.per_s / 1e9, 2) for r in bounds.bandwidth},
        "weight_bytes": w_bytes,
        "kv_bytes_per_step": round(kv_bytes),
        "bytes_per_step": round(step_bytes),
        # Positions the cache holds, and those decode attention reads per step on average (the
        # cache cut to a bucket past the filled part); the roofline counts only the valid ones.
        "cache_len": cache_len_for(bench.context, bench.steps + 1),
        "attended_positions": round(attended_positions(bench.context, bench.steps), 1),
        "valid_positions": mean_valid_len(bench.context, bench.steps),
        "effective_gbs": round(ours.tok_per_s * step_bytes / 1e9, 2),
        "roofline_tok_per_s": round(roofline, 2),
        "roofline_fraction": round(ours.tok_per_s / roofline, 4),
        "matmul_gflops": round(bounds.matmul_flops_per_s / 1e9, 1),
        "flops_per_step": round(flops),
        "compute_roof_tok_per_s": round(compute_roof, 2),
        "compute_roof_fraction": round(ours.tok_per_s / compute_roof, 4),
    }
    if hf is not None:
        n = min(len(hf.tokens_row0), len(ours.tokens_row0))
        report.update({
            "hf_tok_per_s": round(hf.tok_per_s, 2),
            "hf_tok_per_s_aggregate": round(hf.tok_per_s * B, 2),
            "hf_tok_per_s_runs": [round(r, 2) for r in hf.runs_tok_per_s],
            "vs_hf": round(ours.tok_per_s / hf.tok_per_s, 4),
            "tokens_match": hf.tokens_row0[:n] == ours.tokens_row0[:n],
            "tokens_compared": n,
        })
    report["env"] = env
    return report


def format_table(r: dict) -> str:
    """The report as aligned `label  value` lines for a terminal."""
    rows = [
        Row("model", f"{r['model']} ({r['dtype']})  batch {r['batch']}  context {r['context']}  steps {r['steps']}  "
                     f"repeats {r['repeats']}"),
        Row("ours", f"{r['tok_per_s']:.1f} tok/s per sequence, {r['tok_per_s_aggregate']:.1f} tok/s in all, "
                    f"{r['step_ms']:.2f} ms/step (compile {r['compile_s']:.1f} s, prefill {r['prefill_ms']:.0f} ms)"),
        Row("kernels", r["kernels"]),
        Row("bandwidth", f"{r['bandwidth_gbs']:.1f} GB/s streaming read ({r['bandwidth_source']}; "
                         + ", ".join(f"{k} {v:.1f}" for k, v in r["bandwidth_candidates"].items()) + ")"),
        Row("bytes/step", f"{r['bytes_per_step'] / 1e6:.1f} MB = weights {r['weight_bytes'] / 1e6:.1f} MB "
                          f"+ KV {r['kv_bytes_per_step'] / 1e6:.1f} MB ({r['valid_positions']:.1f} valid positions "
                          f"per sequence; attention reads {r['attended_positions']:.1f})"),
        Row("roofline", f"{r['roofline_tok_per_s']:.1f} tok/s per sequence -> ours at "
                        f"{r['roofline_fraction']:.0%} ({r['effective_gbs']:.1f} GB/s effective)"),
        Row("compute roof", f"{r['compute_roof_tok_per_s']:.1f} tok/s per sequence at {r['matmul_gflops']:.0f} "
                            f"GFLOP/s -> ours at {r['compute_roof_fraction']:.0%}"),
    ]
    if "hf_tok_per_s" in r:
        rows.append(Row("HF generate", f"{r['hf_tok_per_s']:.1f} tok/s per sequence -> ours/HF "
                                       f"{r['vs_hf']:.2f}x (first {r['tokens_compared']} tokens "
                                       f"{'match' if r['tokens_match'] else 'DIFFER'})"))
    if "llamacpp" in r:
        lc = r["llamacpp"]
        for precision in ("f32", "f16"):
            p = lc[precision]
            rows.append(Row(f"llama.cpp {precision}", f"{p['tok_per_s']:.1f} tok/s ({lc['threads']} threads) -> ours/llama.cpp "
                                                      f"{p['ours_vs']:.2f}x (first {p['tokens_compared']} tokens "
                                                      f"{'match' if p['tokens_match'] else 'DIFFER'})"))
    if "mesh" in r:
        rows += mesh_rows(r["mesh"])
    rows.append(env_row(r["env"]))
    return aligned(rows)


def check_fits(config: ModelConfig, bench: DecodeBench) -> None:
    """The prompts and the decoded tokens must fit the model's context."""
    # max_new_tokens is steps + 1: the prefill yields the first token, each step one more.
    if bench.context + bench.steps + 1 > config.max_seq_len:
        raise WaferError(f"--context {bench.context} + --steps {bench.steps} + 1 exceeds the model's "
                         f"context of {config.max_seq_len}")
    if bench.compare_llamacpp and bench.batch != 1:
        raise WaferError(f"--compare-llamacpp decodes one sequence; use --batch 1 (got {bench.batch})")


def run_decode_bench(loaded: LoadedModel, bench: DecodeBench, mesh_setup: MeshSetup | None,
                     load_start: float | None, progress: Callable[[str], None]) -> dict:
    """Measure the bounds, our single-device decoder (and the wafer decoder on `mesh_setup`), the
    bounds again and optionally HF, in that order; return the report (the --json object).

    `bench` must fit the model (`check_fits`); `load_start` is the load average before the run;
    `progress` receives a line before each stage.
    """
    config = loaded.config
    prompts = random_prompts(bench.batch, bench.context, config.vocab_size, bench.seed)
    progress("measuring bandwidth and matmul peak...")
    bounds = measure_machine()
    progress(f"decoding (batch {bench.batch}, {bench.steps} steps, 1 compile run + {bench.repeats} timed)...")
    generator = Generator(loaded.params, config)
    ours = time_ours(generator, prompts, bench.steps, bench.repeats)
    kernels = kernel_path(generator)
    del generator
    mesh = None
    if mesh_setup is not None:
        progress(f"decoding on the {mesh_setup.grid} mesh ({mesh_setup.executor.value}, "
                 f"{mesh_setup.schedule.value if mesh_setup.schedule else 'schedule auto'})...")
        decoder = make_decoder(loaded, mesh_setup, bench.batch, bench.context + bench.steps + 1, greedy=True)
        mesh = mesh_report(decoder, mesh_setup, time_ours(decoder, prompts, bench.steps, bench.repeats), ours)
        del decoder  # its tiles and cache leave memory before the bounds and HF run
    progress("measuring bandwidth and matmul peak again...")
    bounds = bounds.best_with(measure_machine())
    hf = None
    if bench.compare_hf:
        progress("loading HF reference and timing its generate...")
        hf = time_hf(loaded.source, prompts, bench.steps, bench.repeats, min(MATCH_TOKENS, bench.steps + 1),
                     params_dtype(loaded.params).name)
    llamacpp = None
    if bench.compare_llamacpp:
        from bench.llamacpp_peer import converted_gguf, time_llamacpp
        from model.load import cache_dir

        threads = len(os.sched_getaffinity(0))
        peers = []
        for precision in ("f32", "f16"):
            progress(f"converting the GGUF to {precision} with llama.cpp and timing its decode ({threads} threads)...")
            path = converted_gguf(loaded.source, precision, cache_dir())
            peers.append(time_llamacpp(path, precision, prompts[0], bench.steps, bench.repeats, threads))
        llamacpp = llamacpp_report(peers, ours)
    report = build_report(config, bench, loaded.params, bounds, ours, hf, environment(hf, load_start))
    report["kernels"] = kernels
    if llamacpp is not None:
        report["llamacpp"] = llamacpp
    if mesh is not None:
        report["mesh"] = mesh
    return report
