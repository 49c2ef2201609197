"""`wafer generate`: text from a prompt, on one device or on a core mesh with --mesh, which may span
processes (--coordinator, --num-processes, --process-id: every process runs the same command but
its id, decodes the same tokens, and only process 0 prints them; the others exit 0 silently)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from cli.flags import (add_dtype_arg, add_mesh_args, add_model_args, add_process_args, add_prompt_args,
                       check_prompt_args, prompt_ids_from_args, setup_mesh)
from mesh.errors import WaferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_dtype_arg(p)
    add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trace", default=None, metavar="DIR", help="write a jax.profiler trace to DIR")
    add_mesh_args(p)
    add_process_args(p)


def run(args) -> int:
    from bench.mesh_setup import make_decoder
    from model.generate import check_request
    from model.sampling import Sampling
    from model.load import load_model

    check_prompt_args(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    mesh_setup = setup_mesh(args)
    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    prompt_ids = prompt_ids_from_args(args, loaded)
    check_request(loaded.config, [prompt_ids], args.max_new_tokens)
    spread = args.coordinator is not None
    with stdout_to_stderr() if spread else contextlib.nullcontext():
        decoder = make_decoder(loaded, mesh_setup, 1, len(prompt_ids) + args.max_new_tokens, sampling.greedy)
        with profiler_trace(args.trace):
            result = decoder.generate([prompt_ids], args.max_new_tokens, sampling)
    if spread and args.process_id != 0:
        return 0  # every process decoded the same tokens; process 0 alone answers
    tokens = result.tokens[0]
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    if args.json:
        print(json.dumps({
            "model": loaded.config.name,
            "prompt_ids": prompt_ids,
            "tokens": tokens,
            "text": text,
            "ttft_ms": round(result.ttft_s * 1e3, 3),
            "compile_s": round(result.compile_s, 3),
            "tok_per_s": round(result.tok_per_s, 2),
            "decode_steps": result.decode_steps,
            "mesh": args.mesh or "1x1 (single device)",
            **({"processes": args.num_processes} if spread else {}),
            **({"executor": args.executor, "schedule": decoder.opts.schedule.value,
                "layout": "heads" if decoder.layout.seg == 1 else "full", "head_segment": decoder.layout.seg,
                "sram_per_core_bytes": decoder.plan.bytes_by_kind(),
                "useful_fraction": decoder.plan.useful_fraction} if mesh_setup else {}),
        }))
    else:
        print(text if text is not None else " ".join(map(str, tokens)))
        print(f"[{len(tokens)} tokens, ttft {result.ttft_s * 1e3:.1f} ms, {result.tok_per_s:.1f} tok/s, "
              f"compile {result.compile_s:.1f} s]", file=sys.stderr)
    return 0


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what native code writes to file descriptor 1 to stderr for the block: gloo (the CPU
    collectives of a mesh spanning processes) prints a line per connection there, and stdout must
    hold the answer alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def profiler_trace(trace_dir: str | None):
    """A jax.profiler trace around the block when `trace_dir` is given (named scope per kernel)."""
    if trace_dir is None:
        yield
        return
    import jax
    try:
        os.makedirs(trace_dir, exist_ok=True)
    except OSError as e:
        raise WaferError(f"--trace {trace_dir}: {e.strerror}") from None
    with jax.profiler.trace(trace_dir):
        yield
