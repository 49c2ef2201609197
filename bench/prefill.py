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

import argparse
import json
import statistics
import time


from bench.bandwidth import matmul_peak_in_fresh_process
from bench.decode import (_busy_check, _int_at_least, _positive_int, _progress, aligned, env_row, environment,
                          random_prompts)
from mesh.errors import WaferError
from model.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_positive_int, default=8, help="prompts prefilled together")
    p.add_argument("--prompt-len", type=_positive_int, default=512, help="tokens per prompt")
    p.add_argument("--mesh", default="1x1",
                   help="prefill mesh RxC: R data-parallel rows (batch split), C tensor-parallel columns "
                        "(heads and F split); N means 1xN (default 1x1: one device)")
    p.add_argument("--executor", choices=["devices", "vcores"], default="devices",
                   help="devices: one JAX device per mesh core; vcores: virtual cores on one device")
    p.add_argument("--chunk", type=_positive_int, default=None, help="tokens per prefill chunk (default 2048)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers' forward on the batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=_int_at_least(0, ">= 0"), default=0, help="seed of the random prompts")


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
            "first_tokens": result.first_tokens.tolist()}


def time_hf(source: str, prompts: list[list[int]], repeats: int) -> dict:
    """HF transformers' forward over the batch (KV cache produced, as a prefill must)."""
    import torch

    from bench.hf_peer import load_hf_model

    model = load_hf_model(source)
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


def build_report(config: ModelConfig, args, grid, peak, ours: dict, hf: dict | None, env: dict) -> dict:
    tokens = args.batch * args.prompt_len
    flops = prefill_flops(config, [args.prompt_len] * args.batch)
    achieved = flops / ours["seconds"]
    report = {
        "model": config.name,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "mesh": str(grid),
        "executor": args.executor,
        "data_parallel": grid.rows,
        "tensor_parallel": grid.cols,
        "repeats": args.repeats,
        "tok_per_s": round(tokens / ours["seconds"], 1),
        "tok_per_s_runs": [round(tokens / s, 1) for s in ours["runs"]],
        "prefill_s": round(ours["seconds"], 4),
        "compile_s": round(ours["compile_s"], 2),
        "flops": flops,
        "achieved_gflops": round(achieved / 1e9, 1),
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
    rows = [
        ("model", f"{r['model']}  batch {r['batch']} x {r['prompt_len']} tokens  mesh {r['mesh']} "
                  f"({r['data_parallel']} data x {r['tensor_parallel']} tensor parallel, {r['executor']})"),
        ("ours", f"{r['tok_per_s']:.0f} tok/s ({r['prefill_s'] * 1e3:.0f} ms per batch, compile {r['compile_s']:.1f} s)"),
        ("FLOPs", f"{r['flops'] / 1e9:.1f} GFLOP needed -> {r['achieved_gflops']:.0f} GFLOP/s"),
        ("matmul peak", f"{r['matmul_peak_gflops']:.0f} GFLOP/s ({r['matmul_peak_source']}) -> MFU {r['mfu']:.0%}"),
    ]
    if "hf_tok_per_s" in r:
        rows.append(("HF forward", f"{r['hf_tok_per_s']:.0f} tok/s ({r['hf_gflops']:.0f} GFLOP/s of needed work) "
                                   f"-> ours/HF {r['vs_hf']:.2f}x (first tokens "
                                   f"{'match' if r['first_tokens_match'] else 'DIFFER'})"))
    rows.append(env_row(r["env"]))
    return aligned(rows)


def run(args) -> int:
    from mesh.devices import ensure_cpu_devices
    from mesh.executors import Executor, Grid

    grid = Grid.parse(args.mesh)
    executor = Executor(args.executor)
    if executor is Executor.DEVICES:
        ensure_cpu_devices(grid.cores)  # before JAX starts
    from mesh.executors import make_core_mesh
    from model.load import load_model
    from model.prefill import PREFILL_CHUNK, Prefiller

    loaded = load_model(args.model, args.checkpoint)
    config = loaded.config
    if args.prompt_len >= config.max_seq_len:
        raise WaferError(f"--prompt-len {args.prompt_len} leaves no room in the model's context of "
                         f"{config.max_seq_len}")
    prompts = random_prompts(args.batch, args.prompt_len, config.vocab_size, args.seed)
    load_start = _busy_check()
    _progress("measuring the matmul peak...")
    peak = matmul_peak_in_fresh_process()
    _progress(f"prefilling {args.batch} x {args.prompt_len} tokens on the {grid} mesh "
              f"(1 compile run + {args.repeats} timed)...")
    prefiller = Prefiller(loaded.params, config, make_core_mesh(grid, executor), chunk=args.chunk or PREFILL_CHUNK)
    ours = time_ours(prefiller, prompts, args.repeats)
    del prefiller
    _progress("measuring the matmul peak again...")
    peak = max(peak, matmul_peak_in_fresh_process(), key=lambda r: r.per_s)
    hf = None
    if args.compare_hf:
        _progress("loading HF reference and timing its forward...")
        hf = time_hf(loaded.source, prompts, args.repeats)
    report = build_report(config, args, grid, peak, ours, hf, environment(None, load_start))
    print(json.dumps(report) if args.json else format_table(report))
    return 0
