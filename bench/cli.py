"""The `wafer` command line.

Every failure the user can cause ends as one line on stderr and exit code 2; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from bench.mesh_args import add_mesh_args, make_decoder, setup_mesh
from mesh.errors import WaferError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit code 2."""

    def error(self, message: str):
        raise WaferError(f"{self.prog}: {message}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset name (default: smollm2-135m, the embedded model)")
    src.add_argument("--checkpoint", default=None, help="a .gguf file or an HF checkpoint folder")


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise WaferError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise WaferError("--prompt-ids is empty")
    return ids


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


def check_prompt_args(args) -> None:
    """The prompt flags' own consistency, before anything is loaded."""
    if args.chat and args.prompt is None:
        raise WaferError("--chat needs --prompt text (token ids are used as they are)")


def prompt_ids_from_args(args, loaded) -> list[int]:
    """The prompt's token ids: --prompt encoded (chat-wrapped with --chat) or --prompt-ids."""
    if args.prompt is None:
        return parse_prompt_ids(args.prompt_ids)
    if loaded.tokenizer is None:
        raise WaferError(f"{loaded.source} ships no tokenizer; pass --prompt-ids")
    return loaded.tokenizer.encode_chat(args.prompt) if args.chat else loaded.tokenizer.encode(args.prompt)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wafer", description="Wafer-scale transformer decode in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text on one device, or on a core mesh with --mesh")
    add_model_args(gen)
    add_prompt_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--trace", default=None, metavar="DIR", help="write a jax.profiler trace to DIR")
    add_mesh_args(gen)
    gen.set_defaults(run=run_generate)

    from bench import kv as kv_cli
    kv_cli.add_commands(sub, add_model_args, _Parser)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    from bench import decode as decode_bench
    dec = bench_sub.add_parser("decode", help="decode tokens/s against the bandwidth roofline and HF")
    add_model_args(dec)
    decode_bench.add_arguments(dec)
    dec.set_defaults(run=decode_bench.run)
    from bench import prefill as prefill_bench
    pre = bench_sub.add_parser("prefill", help="batched prefill tokens/s and MFU against the matmul peak and HF")
    add_model_args(pre)
    prefill_bench.add_arguments(pre)
    pre.set_defaults(run=prefill_bench.run)
    kv_bench = bench_sub.add_parser("kv", help="KV-cache serialize/deserialize and transport throughput vs memcpy")
    kv_cli.add_bench_arguments(kv_bench)
    kv_bench.set_defaults(run=kv_cli.run_bench)

    from bench import profile as profile_cmd
    prof = sub.add_parser("profile", help="what a decode layout costs on a real wafer (traced, nothing run)")
    profile_cmd.add_arguments(prof)
    prof.set_defaults(run=profile_cmd.run)
    return parser


def run_generate(args) -> int:
    from model.generate import Sampling
    from model.load import load_model

    check_prompt_args(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    mesh_setup = setup_mesh(args)
    loaded = load_model(args.model, args.checkpoint)
    tokenizer = loaded.tokenizer
    prompt_ids = prompt_ids_from_args(args, loaded)
    from model.generate import check_request
    check_request(loaded.config, [prompt_ids], args.max_new_tokens)
    decoder = make_decoder(loaded, mesh_setup, 1, len(prompt_ids) + args.max_new_tokens, sampling.greedy)
    with profiler_trace(args.trace):
        result = decoder.generate([prompt_ids], args.max_new_tokens, sampling)
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
            **({"executor": args.executor, "schedule": args.schedule,
                "sram_per_core_bytes": decoder.plan.bytes_by_kind()} if mesh_setup else {}),
        }))
    else:
        print(text if text is not None else " ".join(map(str, tokens)))
        print(f"[{len(tokens)} tokens, ttft {result.ttft_s * 1e3:.1f} ms, {result.tok_per_s:.1f} tok/s, "
              f"compile {result.compile_s:.1f} s]", file=sys.stderr)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except WaferError as e:
        print(f"wafer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("wafer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
