"""`wafer bench prefill`: batched prefill tokens/s against this machine's matmul peak and HF transformers.

One run measures everything it reports: the matmul peak (the best of several large square
float32 products, `bench.bandwidth.measure_matmul_peak`, run before and after ours in a fresh
process, since emulated CPU devices slow this process's own matmuls), our prefill on the chosen prefill mesh,
and optionally HF transformers' forward over the same batch. Prefill is compute bound, so its
figure of merit is the fraction of the matmul peak it reaches (MFU), counting only the FLOPs a
prefill must do:

  per prompt token   2 x every matrix weight of the layers (QKV, O, gate/up, down)
  attention          4 x N x H per (query, visible key) pair, causal: n (n + 1) / 2 pairs per layer
  LM head            2 x D x V once per prompt (only the last token's logits are read)

Not counted: norms, RoPE, softmax and the embedding gather (elementwise, a few percent at most),
padding, the LM head at other positions, and zero heads of a padded tensor-parallel split.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Callable

from bench.bandwidth import Rate, matmul_peak_in_fresh_process
from bench.decode import environment, random_prompts
from bench.table import Row, aligned, env_row
from mesh.errors import WaferError
from model.config import ModelConfig

if TYPE_CHECKING:
    from mesh.executors import Executor, Grid
    from model.load import LoadedModel


@dataclasses.dataclass(frozen=True)
class PrefillBench:
    """What one run measures: `batch` random prompts (from `seed`) of `prompt_len` tokens each,
    prefilled together in chunks of `chunk` tokens (None: the prefiller's default) in each of
    `repeats` timed runs; HF's forward over the same batch beside ours with `compare_hf`."""

    batch: int
    prompt_len: int
    chunk: int | None
    repeats: int
    seed: int
    compare_hf: bool


def prefill_flops(config: ModelConfig, lengths: list[int]) -> int:
    """FLOPs a prefill of prompts of `lengths` must do (see the module docstring)."""
    D, F, N, K, H, L = (config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim,
                        config.n_layers)
    per_token = 2 * L * (D * (N + 2 * K) * H + N * H * D + D * 2 * F + F * D)
    attention_pairs = sum(n * (n + 1) // 2 for n in lengths)
    return (per_token * sum(lengths) + 4 * N * H * L * attention_pairs
            + 2 * D * config.vocab_size * len(lengths))


def time_ours(prefiller, prompts: list[list[int]], repeats: int) -> dict:
    """Wall time of whole `prefill` calls (placing the prompts up to first tokens on the host)."""
    first = prefiller.prefill(prompts)  # compiles and warms up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = prefiller.prefill(prompts)
        runs.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(runs), "runs": runs, "compile_s": first.compile_s,
            "first_tokens": result.first_tokens.tolist(), "dtype": prefiller.dtype.name}


def time_hf(source: str, prompts: list[list[int]], repeats: int, dtype: str = "float32") -> dict:
    """HF transformers' forward over the batch (KV cache produced, as a prefill must), in `dtype`."""
    import torch

    from bench.hf_peer import load_hf_model

    model = load_hf_model(source, dtype)
    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)

    def forward():
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=True).logits
        if ids.is_cuda:
            torch.cuda.synchronize()
        return logits

    forward()  # warm-up: allocator, thread pool, lazy init
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = forward()
        runs.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(runs), "runs": runs, "first_tokens": logits[:, -1].argmax(-1).tolist(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def build_report(config: ModelConfig, bench: PrefillBench, grid: Grid, executor: Executor, peak: Rate, ours: dict,
                 hf: dict | None, env: dict) -> dict:
    """The benchmark's figures as one dict (the --json object)."""
    tokens = bench.batch * bench.prompt_len
    flops = prefill_flops(config, [bench.prompt_len] * bench.batch)
    achieved = flops / ours["seconds"]
    report = {
        "model": config.name,
        "batch": bench.batch,
        "prompt_len": bench.prompt_len,
        "mesh": str(grid),
        "executor": executor.value,
        "data_parallel": grid.rows,
        "tensor_parallel": grid.cols,
        "repeats": bench.repeats,
        "dtype": ours["dtype"],
        "tok_per_s": round(tokens / ours["seconds"], 1),
        "tok_per_s_runs": [round(tokens / s, 1) for s in ours["runs"]],
        "prefill_s": round(ours["seconds"], 4),
        "compile_s": round(ours["compile_s"], 2),
        "flops": flops,
        "achieved_gflops": round(achieved / 1e9, 3),
        "matmul_peak_gflops": round(peak.per_s / 1e9, 1),
        "matmul_peak_source": peak.name,
        "mfu": round(achieved / peak.per_s, 4),
    }
    if hf is not None:
        report.update({
            "hf_tok_per_s": round(tokens / hf["seconds"], 1),
            "hf_tok_per_s_runs": [round(tokens / s, 1) for s in hf["runs"]],
            "hf_gflops": round(flops / hf["seconds"] / 1e9, 1),
            "vs_hf": round(hf["seconds"] / ours["seconds"], 3),
            "first_tokens_match": hf["first_tokens"] == ours["first_tokens"],
        })
        env = dict(env, torch=hf["torch"], torch_threads=hf["torch_threads"])
    report["env"] = env
    return report


def format_table(r: dict) -> str:
    """The report as aligned `label  value` lines for a terminal."""
    rows = [
        Row("model", f"{r['model']} ({r['dtype']})  batch {r['batch']} x {r['prompt_len']} tokens  mesh {r['mesh']} "
                     f"({r['data_parallel']} data x {r['tensor_parallel']} tensor parallel, {r['executor']})"),
        Row("ours", f"{r['tok_per_s']:.0f} tok/s ({r['prefill_s'] * 1e3:.0f} ms per batch, "
                    f"compile {r['compile_s']:.1f} s)"),
        Row("FLOPs", f"{r['flops'] / 1e9:.1f} GFLOP needed -> {r['achieved_gflops']:.0f} GFLOP/s"),
        Row("matmul peak", f"{r['matmul_peak_gflops']:.0f} GFLOP/s ({r['matmul_peak_source']}) -> MFU {r['mfu']:.0%}"),
    ]
    if "hf_tok_per_s" in r:
        rows.append(Row("HF forward", f"{r['hf_tok_per_s']:.0f} tok/s ({r['hf_gflops']:.0f} GFLOP/s of needed work) "
                                      f"-> ours/HF {r['vs_hf']:.2f}x (first tokens "
                                      f"{'match' if r['first_tokens_match'] else 'DIFFER'})"))
    rows.append(env_row(r["env"]))
    return aligned(rows)


def check_fits(config: ModelConfig, bench: PrefillBench) -> None:
    """A prompt must leave room for a decoded token in the model's context."""
    if bench.prompt_len >= config.max_seq_len:
        raise WaferError(f"--prompt-len {bench.prompt_len} leaves no room in the model's context of "
                         f"{config.max_seq_len}")


def run_prefill_bench(loaded: LoadedModel, bench: PrefillBench, grid: Grid, executor: Executor,
                      load_start: float | None, progress: Callable[[str], None]) -> dict:
    """Measure the matmul peak, our prefill on the `grid` mesh, the peak again and optionally HF, in
    that order; return the report (the --json object).

    The CPU devices of `executor` must already be set up and `bench` must fit the model
    (`check_fits`); `load_start` is the load average before the run; `progress` receives a line
    before each stage.
    """
    from mesh.executors import make_core_mesh
    from model.prefill import PREFILL_CHUNK, Prefiller

    config = loaded.config
    prompts = random_prompts(bench.batch, bench.prompt_len, config.vocab_size, bench.seed)
    progress("measuring the matmul peak...")
    peak = matmul_peak_in_fresh_process()
    progress(f"prefilling {bench.batch} x {bench.prompt_len} tokens on the {grid} mesh "
             f"(1 compile run + {bench.repeats} timed)...")
    prefiller = Prefiller(loaded.params, config, make_core_mesh(grid, executor), chunk=bench.chunk or PREFILL_CHUNK)
    ours = time_ours(prefiller, prompts, bench.repeats)
    del prefiller
    progress("measuring the matmul peak again...")
    peak = max(peak, matmul_peak_in_fresh_process(), key=lambda r: r.per_s)
    hf = None
    if bench.compare_hf:
        progress("loading HF reference and timing its forward...")
        hf = time_hf(loaded.source, prompts, bench.repeats, ours["dtype"])
    return build_report(config, bench, grid, executor, peak, ours, hf, environment(None, load_start))
