"""Scaling curves: `wafer bench decode` over batches x contexts and `wafer bench prefill` over
batches x prompt lengths, every point against one bound measured once, at the start of the run.

A curve is a shape, not a target: each point runs few steps and repeats (the report says how
many), and its figures come from the single-point benchmark's own accounting (`bench.decode.
build_report`, `bench.prefill.build_report`), so a point's bytes, FLOPs, bound and fraction are
exactly what `bench decode` / `bench prefill` report for the same inputs.

Decode points start from a KV cache filled with a constant (`filled_cache`) instead of a prefill:
a prefill of 64 prompts of 8K tokens would take this CPU over an hour (about 370 prefill tok/s),
while a decode step's time does not depend on the values in the cache (dense XLA code, no
data-dependent branches; a constant that is neither zero nor denormal). The timed code is the one
`bench decode` times: `Generator.continue_from`, the decode half of `Generator.generate`.

A point whose memory would not fit this machine is skipped with the reason in the table and the
JSON, from a computed estimate (`decode_point_bytes`, `prefill_point_bytes`) against a budget
that is a fraction of the machine's physical memory (`memory_budget`); so is a point that does
not fit the model's context.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Callable

import jax.numpy as jnp
import numpy as np

from bench.bandwidth import MachineBounds, Rate, matmul_peak_in_fresh_process, measure_machine
from bench.decode import DecodeBench, OursResult, build_report, random_prompts
from bench.decode import environment as decode_environment
from bench.profile_report import table
from bench.table import env_row
from mesh.errors import WaferError
from mesh.extent import round_up
from model.cache import KVCache
from model.config import ModelConfig
from model.generate import DECODE_CHUNK, PROMPT_BUCKET, Generator, cache_len_for, chunk_schedule
from model.load import LoadedModel
from model.weights import params_dtype, weight_bytes

# Other processes share this machine's memory (three helpers and the lead, here), so a point may
# use at most this fraction of it.
MEMORY_FRACTION = 0.75
# The value every cached K and V element holds in a decode point (see the module docstring).
FILL_VALUE = 0.01
# Keys of a single-point report that are the run's, not the point's: the sweep reports them once.
RUN_KEYS = ("model", "dtype", "seed", "bandwidth_gbs", "bandwidth_source", "bandwidth_candidates", "matmul_gflops",
            "matmul_peak_gflops", "matmul_peak_source", "mesh", "executor", "data_parallel", "tensor_parallel",
            "env")

GiB = 2 ** 30


def machine_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> int:
    """Bytes one sweep point may hold: MEMORY_FRACTION of the machine's physical memory."""
    return int(MEMORY_FRACTION * machine_memory_bytes())


def check_axis(name: str, values: tuple[int, ...]) -> tuple[int, ...]:
    """A sweep axis: at least one positive integer, none repeated (the CLI parses the list)."""
    if not values:
        raise WaferError(f"{name} is empty")
    if min(values) < 1:
        raise WaferError(f"{name} must be positive integers, got {min(values)}")
    if len(set(values)) != len(values):
        raise WaferError(f"{name} repeats a value: {','.join(map(str, values))}")
    return tuple(values)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1e6:.1f} MB"


def _with_notes(header: list[str], rows: list[list], notes: list[str]) -> str:
    """`table` of the rows, each line followed by its note (left-aligned, free text)."""
    lines = table(header, rows).splitlines()
    return "\n".join([lines[0] + "  note", lines[1]] + [f"{line}  {note}".rstrip() for line, note in zip(lines[2:], notes)])


# ------------------------------------------------------------------------------------------ decode


@dataclasses.dataclass(frozen=True)
class DecodeSweep:
    """Every (batch, context) of `batches` x `contexts`, decoded for `steps` steps after the first
    token in each of `repeats` timed runs (after one run that compiles); `seed` picks the first
    tokens."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    steps: int
    repeats: int
    seed: int = 0

    def __post_init__(self):
        check_axis("--batches", self.batches)
        check_axis("--contexts", self.contexts)
        if self.steps < 1 or self.repeats < 1:
            raise WaferError(f"a sweep needs steps and repeats >= 1, got {self.steps} and {self.repeats}")

    def points(self) -> list[tuple[int, int]]:
        return [(b, c) for c in self.contexts for b in self.batches]


def decode_point_bytes(config: ModelConfig, w_bytes: int, itemsize: int, batch: int, context: int,
                       steps: int) -> int:
    """Memory a decode point holds at its peak: the weights and the cache of `cache_len_for`
    positions per sequence, twice when a chunk grows or cuts it (the copy and the original live
    together while it is made). Activations are a few rows of logits and scores, left out."""
    S = cache_len_for(context, steps + 1)
    cache = batch * S * config.kv_bytes_per_token(itemsize)
    cuts = [cut for _, cut in chunk_schedule(S, context, steps + 1, DECODE_CHUNK)]
    copies = 2 if any(cut != prev for cut, prev in zip(cuts, [S] + cuts)) else 1
    return w_bytes + copies * cache


def decode_skip_reason(config: ModelConfig, w_bytes: int, itemsize: int, batch: int, context: int, steps: int,
                       budget: int) -> str | None:
    """Why the point cannot run here (None: it can)."""
    if context + steps + 1 > config.max_seq_len:
        return f"context {context} + {steps} steps + 1 exceeds the model's context of {config.max_seq_len}"
    need = decode_point_bytes(config, w_bytes, itemsize, batch, context, steps)
    if need > budget:
        S = cache_len_for(context, steps + 1)
        return (f"needs {_gib(need)} (weights + KV cache of {batch} x {S} positions) > budget {_gib(budget)} "
                f"({MEMORY_FRACTION:.0%} of {_gib(machine_memory_bytes())})")
    return None


def filled_cache(config: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
    """A cache of `max_len` positions per sequence with every element FILL_VALUE."""
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    make = lambda: tuple(jnp.full(shape, FILL_VALUE, dtype) for _ in range(config.n_layers))
    return KVCache(make(), make())


def time_decode_point(generator: Generator, batch: int, context: int, steps: int, repeats: int,
                      seed: int) -> OursResult:
    """`bench.decode.time_ours`'s figures for decoding `steps` steps after a first token, from a
    filled cache of `context` positions per sequence (no prefill: `prefill_ms` is 0)."""
    config = generator.config
    first_B = np.asarray(random_prompts(batch, 1, config.vocab_size, seed), np.int32)[:, 0]
    S = cache_len_for(context, steps + 1)
    runs = []
    for _ in range(1 + repeats):  # the first run compiles and warms up
        cache = filled_cache(config, batch, S, generator.dtype)
        runs.append(generator.continue_from(first_B, cache, [context] * batch, steps + 1, stop_on_eos=False))
        del cache  # donated: the next run's cache takes its memory
    for r in runs:
        if r.decode_steps != steps:
            raise AssertionError(f"the decoder ran {r.decode_steps} decode steps, asked for {steps}")
    timed = runs[1:]
    return OursResult(tok_per_s=statistics.median(r.tok_per_s for r in timed),
                      runs_tok_per_s=[r.tok_per_s for r in timed], prefill_ms=0.0,
                      compile_s=runs[0].compile_s, tokens_row0=timed[-1].tokens[0])


def decode_point(config: ModelConfig, sweep: DecodeSweep, params, bounds: MachineBounds, batch: int, context: int,
                 ours: OursResult) -> dict:
    """One point's figures: the single-point report for the same inputs, less the run's keys."""
    bench = DecodeBench(batch, context, sweep.steps, sweep.repeats, sweep.seed, False)
    report = build_report(config, bench, params, bounds, ours, None, {})
    point = {k: v for k, v in report.items() if k not in RUN_KEYS and k != "prefill_ms"}
    return {"skipped": None, **point}


def run_decode_sweep(loaded: LoadedModel, sweep: DecodeSweep, load_start: float | None,
                     progress: Callable[[str], None], advance: Callable[[dict], None],
                     budget: int | None = None) -> dict:
    """Measure the bounds once, then every point of `sweep` in order; the report (--json object).

    `advance(point)` is called with each point's entry of the report as soon as it is measured
    (or skipped), so a long sweep shows its figures as it goes; `progress` receives a line before
    each stage; `budget` is the memory a point may hold (default `memory_budget()`).
    """
    config, params = loaded.config, loaded.params
    budget = memory_budget() if budget is None else budget
    w_bytes, itemsize = weight_bytes(params), params_dtype(params).itemsize
    progress("measuring bandwidth and matmul peak (once, for every point)...")
    bounds = measure_machine()
    generator = Generator(params, config)
    points = []
    for batch, context in sweep.points():
        reason = decode_skip_reason(config, w_bytes, itemsize, batch, context, sweep.steps, budget)
        if reason is None:
            ours = time_decode_point(generator, batch, context, sweep.steps, sweep.repeats, sweep.seed)
            points.append(decode_point(config, sweep, params, bounds, batch, context, ours))
        else:
            points.append({"batch": batch, "context": context, "skipped": reason,
                           "memory_bytes": decode_point_bytes(config, w_bytes, itemsize, batch, context, sweep.steps)})
        advance(points[-1])
    return {
        "kind": "decode_sweep",
        "model": config.name,
        "dtype": params_dtype(params).name,
        "steps": sweep.steps,
        "repeats": sweep.repeats,
        "seed": sweep.seed,
        "cache": f"filled with {FILL_VALUE} (no prefill)",
        "bandwidth_gbs": round(bounds.bandwidth_bytes_per_s / 1e9, 2),
        "bandwidth_source": bounds.best_bandwidth.name,
        "bandwidth_candidates": {r.name: round(r.per_s / 1e9, 2) for r in bounds.bandwidth},
        "matmul_gflops": round(bounds.matmul_flops_per_s / 1e9, 1),
        "memory_budget_bytes": budget,
        "points": points,
        "env": decode_environment(None, load_start),
    }


def format_decode_point(p: dict) -> str:
    """One point of a decode sweep as one line, written as soon as it is measured."""
    where = f"batch {p['batch']}, context {p['context']}"
    if p["skipped"]:
        return f"{where}: skipped ({p['skipped']})"
    return (f"{where}: {p['tok_per_s']:.1f} tok/s a sequence ({p['tok_per_s_aggregate']:.1f} in all), "
            f"{p['roofline_fraction']:.2f} of the bound")


def format_decode_sweep(r: dict) -> str:
    """The sweep as a header and one row per point."""
    head = (f"{r['model']} ({r['dtype']}) decode sweep: {r['steps']} steps x {r['repeats']} timed runs per point "
            f"(median; 1 compile run first), cache {r['cache']}\n"
            f"bound: {r['bandwidth_gbs']:.1f} GB/s ({r['bandwidth_source']}), measured once for every point; "
            f"memory budget {_gib(r['memory_budget_bytes'])}")
    rows = []
    for p in r["points"]:
        if p["skipped"]:
            rows.append([p["batch"], p["context"], "-", "-", "-", "-", "-"])
        else:
            rows.append([p["batch"], p["context"], f"{p['tok_per_s']:.1f}", f"{p['tok_per_s_aggregate']:.1f}",
                         f"{p['bytes_per_step'] / 1e6:.1f}", f"{p['roofline_tok_per_s']:.1f}",
                         f"{p['roofline_fraction']:.2f}"])
    header = ["batch", "context", "tok/s per seq", "tok/s all", "MB/step", "bound tok/s per seq", "of bound"]
    return "\n".join([head, _with_notes(header, rows, _notes(r["points"])), env_line(r["env"])])


def _notes(points: list[dict]) -> list[str]:
    return [f"skipped: {p['skipped']}" if p["skipped"] else "" for p in points]


def env_line(env: dict) -> str:
    row = env_row(env)
    return f"{row.label}  {row.value}"


# ----------------------------------------------------------------------------------------- prefill


@dataclasses.dataclass(frozen=True)
class PrefillSweep:
    """Every (batch, prompt length) of `batches` x `prompt_lens`, prefilled in chunks of `chunk`
    tokens (None: the prefiller's default) in each of `repeats` timed runs."""

    batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    chunk: int | None
    repeats: int
    seed: int = 0

    def __post_init__(self):
        check_axis("--batches", self.batches)
        check_axis("--prompt-lens", self.prompt_lens)
        if self.repeats < 1:
            raise WaferError(f"a sweep needs repeats >= 1, got {self.repeats}")

    def points(self) -> list[tuple[int, int]]:
        return [(b, n) for b in self.batches for n in self.prompt_lens]


def prefill_point_bytes(config: ModelConfig, w_bytes: int, itemsize: int, batch: int, prompt_len: int, chunk: int,
                        rows: int = 1) -> int:
    """Memory a prefill point holds at its peak, estimated: the weights on each of `rows` data-parallel
    rows, two caches (a timed run's while the last run's result still holds its own) and one
    chunk's activations (the residual stream, QKV, gate|up and the down input, per token)."""
    total = round_up(prompt_len, PROMPT_BUCKET)
    T = min(chunk, total)
    S = round_up(total, T)
    cache = batch * S * config.kv_bytes_per_token(itemsize)
    D, F, N, K, H = config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim
    activations = batch * T * (3 * D + (N + 2 * K) * H + 3 * F) * itemsize
    return rows * w_bytes + 2 * cache + activations


def prefill_skip_reason(config: ModelConfig, need: int, prompt_len: int, budget: int) -> str | None:
    if prompt_len >= config.max_seq_len:
        return f"prompt of {prompt_len} leaves no room in the model's context of {config.max_seq_len}"
    if need > budget:
        return (f"needs {_gib(need)} (weights, caches, one chunk's activations) > budget {_gib(budget)} "
                f"({MEMORY_FRACTION:.0%} of {_gib(machine_memory_bytes())})")
    return None


def run_prefill_sweep(loaded: LoadedModel, sweep: PrefillSweep, grid, executor, load_start: float | None,
                      progress: Callable[[str], None], advance: Callable[[dict], None],
                      budget: int | None = None) -> dict:
    """Measure the matmul peak once, then every point of `sweep` on the `grid` mesh; the report."""
    from bench import prefill as single
    from mesh.executors import make_core_mesh
    from model.prefill import PREFILL_CHUNK, Prefiller

    config, params = loaded.config, loaded.params
    budget = memory_budget() if budget is None else budget
    w_bytes, itemsize = weight_bytes(params), params_dtype(params).itemsize
    chunk = sweep.chunk or PREFILL_CHUNK
    prefiller = Prefiller(params, config, make_core_mesh(grid, executor), chunk=chunk)  # refuses a bad chunk
    progress("measuring the matmul peak (once, for every point)...")
    peak: Rate = matmul_peak_in_fresh_process()
    points = []
    for batch, prompt_len in sweep.points():
        need = prefill_point_bytes(config, w_bytes, itemsize, batch, prompt_len, chunk, grid.rows)
        reason = prefill_skip_reason(config, need, prompt_len, budget)
        if reason is None:
            prompts = random_prompts(batch, prompt_len, config.vocab_size, sweep.seed)
            ours = single.time_ours(prefiller, prompts, sweep.repeats)
            bench = single.PrefillBench(batch, prompt_len, sweep.chunk, sweep.repeats, sweep.seed, False)
            report = single.build_report(config, bench, grid, executor, peak, ours, None, {})
            points.append({"skipped": None, **{k: v for k, v in report.items() if k not in RUN_KEYS}})
        else:
            points.append({"batch": batch, "prompt_len": prompt_len, "skipped": reason, "memory_bytes": need})
        advance(points[-1])
    return {
        "kind": "prefill_sweep",
        "model": config.name,
        "dtype": prefiller.dtype.name,
        "mesh": str(grid),
        "executor": executor.value,
        "chunk": chunk,
        "repeats": sweep.repeats,
        "seed": sweep.seed,
        "matmul_peak_gflops": round(peak.per_s / 1e9, 1),
        "matmul_peak_source": peak.name,
        "memory_budget_bytes": budget,
        "points": points,
        "env": decode_environment(None, load_start),
    }


def format_prefill_point(p: dict) -> str:
    """One point of a prefill sweep as one line, written as soon as it is measured."""
    where = f"batch {p['batch']}, prompt {p['prompt_len']}"
    if p["skipped"]:
        return f"{where}: skipped ({p['skipped']})"
    return f"{where}: {p['tok_per_s']:.0f} tok/s, {p['achieved_gflops']:.1f} GFLOP/s, MFU {p['mfu']:.3f}"


def format_prefill_sweep(r: dict) -> str:
    head = (f"{r['model']} ({r['dtype']}) prefill sweep on the {r['mesh']} mesh ({r['executor']}): "
            f"{r['repeats']} timed runs per point (median; 1 compile run first), chunks of {r['chunk']}\n"
            f"bound: matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s ({r['matmul_peak_source']}), measured once "
            f"for every point; memory budget {_gib(r['memory_budget_bytes'])}")
    rows = []
    for p in r["points"]:
        if p["skipped"]:
            rows.append([p["batch"], p["prompt_len"], "-", "-", "-", "-"])
        else:
            rows.append([p["batch"], p["prompt_len"], f"{p['tok_per_s']:.0f}", f"{p['flops'] / 1e9:.1f}",
                         f"{p['achieved_gflops']:.1f}", f"{p['mfu']:.3f}"])
    header = ["batch", "prompt len", "tok/s", "GFLOP needed", "GFLOP/s", "MFU"]
    return "\n".join([head, _with_notes(header, rows, _notes(r["points"])), env_line(r["env"])])
