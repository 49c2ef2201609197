"""`wafer demo`: one request through the disaggregated system, told as it happens.

A prefill worker prefills the prompt on its own mesh, the cache streams to the decode worker over
the checksummed KV transport, layer by layer, into a slot of the emulated wafer decode mesh, and
the decode worker streams the answer back. The demo then says where each phase ran, what the
handoff shipped, the request's TTFT and TPOT, and each decode core's SRAM use against its budget.
It is the serving engine of `wafer serve`, without the HTTP front end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from cli.flags import add_model_args, positive_int, progress
from mesh.errors import WaferError

DEFAULT_PROMPT = "What is the capital of France?"
MIB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user's message (chat template applied)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--decode-mesh", default="4x4", help="the wafer decode mesh, RxC cores (virtual cores)")
    p.add_argument("--sram-budget", default="48MiB",
                   help="bytes per decode core the SRAM planner holds the layout to (emulated: a real "
                        "WSE core has 48 KiB; SmolLM2 on 16 cores needs megabytes)")


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


async def _run(engine, request):
    """Start the workers, run `request`, stop them; returns its tokens, its end and the workers' sites.

    A two-token copy of the request goes first, unmeasured: it compiles the prefill for the
    prompt's length bucket, which a server pays once per bucket, not per request."""

    await engine.start()
    try:
        warm = dataclasses.replace(request, request_id="warm-up", max_new_tokens=2)
        await _collect(engine, warm)
        before = _sums(engine.metrics)
        tokens, end = await _collect(engine, request)
        phases = {k: v - before[k] for k, v in _sums(engine.metrics).items()}
        sites = engine.sites()
    finally:
        await engine.stop()
    return tokens, end, phases, sites


def _sums(metrics) -> dict[str, float]:
    """Running totals of the phase histograms the demo reports."""
    return {name: _histogram_sum(getattr(metrics, name))
            for name in ("prefill_step", "handoff_bytes", "handoff_seconds")}


async def _collect(engine, request):
    from serve.requests import Failed, TokenOut

    tokens, end = [], None
    async for out in engine.submit(request):
        if isinstance(out, TokenOut):
            tokens.append(out.token)
        else:
            end = out
    if isinstance(end, Failed):
        raise WaferError(f"the request failed: {end.reason.value} {end.detail}".rstrip())
    return tokens, end


def run(args) -> int:
    from kernels.allreduce import Schedule
    from mesh.executors import Executor, Grid
    from mesh.wafer import parse_bytes
    from model.load import load_tokenizer
    from model.sampling import Sampling
    from serve.engine import WorkerEngine
    from serve.events import Mode, SchedulerConfig
    from serve.metrics import ServeMetrics
    from serve.options import EngineOptions
    from serve.requests import GenerateRequest
    from serve.timings import tpot, ttft

    grid = Grid.parse(args.decode_mesh)
    budget = parse_bytes(args.sram_budget)
    if budget <= 0:
        raise WaferError(f"--sram-budget {args.sram_budget!r}: must be positive")
    tokenizer = load_tokenizer(args.model, args.checkpoint)
    if tokenizer is None:
        raise WaferError(f"{args.checkpoint} ships no tokenizer (tokenizer.json); the demo needs one")
    prompt_ids = tokenizer.encode_chat(args.prompt)
    options = EngineOptions(model=args.model, checkpoint=args.checkpoint, mode=Mode.DISAGGREGATED,
                            decode_grid=grid, executor=Executor.VCORES, schedule=Schedule.PSUM,
                            max_len=max(256, len(prompt_ids) + args.max_new_tokens), sram_budget=budget,
                            scheduler=SchedulerConfig(mode=Mode.DISAGGREGATED, slots=1))
    metrics = ServeMetrics()
    engine = WorkerEngine(options, metrics)
    progress(f"wafer demo: starting a prefill worker (mesh 1x1) and a decode worker (wafer mesh {grid}, "
             f"virtual cores); they load and compile first")
    request = GenerateRequest("demo", tuple(prompt_ids), args.max_new_tokens, Sampling())
    tokens, done, phases, sites = asyncio.run(_run(engine, request))

    print(f"Q: {args.prompt}")
    print(f"A: {tokenizer.decode(tokens).strip()}")
    print()
    for role in ("prefill", "decode"):
        site = sites.get(role)
        if site is not None:
            cpus = ",".join(map(str, site.cpus))
            print(f"{role:8s} worker  pid {site.pid}, CPUs {cpus}: {'; '.join(site.meshes)}")
    shipped, handoff_s, prefill_s = phases["handoff_bytes"], phases["handoff_seconds"], phases["prefill_step"]
    print(f"prefill  {len(prompt_ids)} prompt tokens in {prefill_s * 1e3:.1f} ms (compiled)")
    print(f"KV       {shipped:,.0f} bytes streamed over TCP, checksummed per layer, prefill done -> "
          f"slot committed in {handoff_s * 1e3:.1f} ms")
    t2 = tpot(done.times)
    print(f"latency  TTFT {ttft(done.times) * 1e3:.0f} ms, TPOT "
          + (f"{t2 * 1e3:.1f} ms ({1 / t2:.1f} tokens/s)" if t2 else "- (one token)")
          + f", {len(tokens)} tokens, finished by {done.reason.value}")
    sram = sites["decode"].sram
    kinds = ", ".join(f"{k} {_mib(b)}" for k, b in sram.by_kind)
    print(f"SRAM     each of the {grid.cores} decode cores holds {_mib(sram.per_core_bytes)} of its "
          f"{_mib(sram.budget)} budget ({sram.per_core_bytes / sram.budget:.0%}): {kinds}")
    print()
    print("next     .venv/bin/wafer serve   (an OpenAI-compatible server on 127.0.0.1:8000), then")
    print("         .venv/bin/wafer bench serve --profile chat --rate 1 --requests 20")
    sys.stdout.flush()
    return 0


def _histogram_sum(histogram) -> float:
    """The running sum of a prometheus_client Histogram (one request: its only observation)."""
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return sample.value
    return 0.0
