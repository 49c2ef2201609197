"""The `wafer` command line: one parser over the command modules of this package.

Every failure the user can cause ends as one line on stderr and exit code 2; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from cli import bench_decode, bench_kv, bench_prefill, bench_serve, bench_serve_costs, bench_serve_overhead, demo, generate
from cli import kv as kv_cmd
from cli import profile as profile_cmd
from cli import serve as serve_cmd
from cli import serve_peer
from cli import simulate as simulate_cmd
from mesh.errors import WaferError

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process its pipe's reader closed (128 + SIGPIPE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit code 2."""

    def error(self, message: str):
        raise WaferError(f"{self.prog}: {message}")


def add_command(sub, name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], int]) -> None:
    """One subcommand: its flags, and the function `main` runs for it."""
    p = sub.add_parser(name, help=help)
    add_arguments(p)
    p.set_defaults(run=run)


def add_group(sub, name: str, help: str):
    """A command group (`wafer kv ...`): the subparsers its commands are added to."""
    return sub.add_parser(name, help=help).add_subparsers(dest=name, required=True, parser_class=_Parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wafer", description="Wafer-scale transformer decode in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_command(sub, "demo", "one request through prefill mesh -> KV stream -> wafer decode mesh, explained",
                demo.add_arguments, demo.run)
    add_command(sub, "generate", "generate text on one device, or on a core mesh with --mesh",
                generate.add_arguments, generate.run)

    kv_sub = add_group(sub, "kv", "KV-cache handoff: export a prefilled cache, inspect it, decode from it")
    add_command(kv_sub, "export", "prefill a prompt and write its KV cache to a file",
                kv_cmd.add_export_arguments, kv_cmd.run_export)
    add_command(kv_sub, "inspect", "print a cache file's header and per-layer checksums (all verified)",
                kv_cmd.add_inspect_arguments, kv_cmd.run_inspect)
    add_command(kv_sub, "import", "land a cache file in a decode slot and continue decoding",
                kv_cmd.add_import_arguments, kv_cmd.run_import)

    bench_sub = add_group(sub, "bench", "benchmarks")
    add_command(bench_sub, "decode", "decode tokens/s against the bandwidth roofline and HF",
                bench_decode.add_arguments, bench_decode.run)
    add_command(bench_sub, "prefill", "batched prefill tokens/s and MFU against the matmul peak and HF",
                bench_prefill.add_arguments, bench_prefill.run)
    add_command(bench_sub, "kv", "KV-cache serialize/deserialize and transport throughput vs memcpy",
                bench_kv.add_arguments, bench_kv.run)
    add_command(bench_sub, "serve", "load an OpenAI-compatible server: TTFT, TPOT, ITL, goodput, max rate",
                bench_serve.add_arguments, bench_serve.run)
    add_command(bench_sub, "serve-overhead", "a running server's TTFT/TPOT vs prefill+handoff and the decode step",
                bench_serve_overhead.add_arguments, bench_serve_overhead.run)
    add_command(bench_sub, "serve-costs", "profile the serving workers into a measured cost file for wafer simulate",
                bench_serve_costs.add_arguments, bench_serve_costs.run)

    add_command(sub, "serve", "the OpenAI-compatible server: prefill and wafer decode workers behind HTTP",
                serve_cmd.add_arguments, serve_cmd.run)
    add_command(sub, "serve-decode-peer", "one more process of a wafer serve decode mesh spanning processes",
                serve_peer.add_arguments, serve_peer.run)

    add_command(sub, "profile", "what a decode layout costs on a real wafer (traced, nothing run)",
                profile_cmd.add_arguments, profile_cmd.run)
    add_command(sub, "simulate", "a fleet on a simulated clock: the serving scheduler driven by cost models",
                simulate_cmd.add_arguments, simulate_cmd.run)
    return parser


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
    except BrokenPipeError:
        # `wafer kv inspect ... | head`: the reader has what it wanted. Stop quietly, as shell tools do.
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not raise the error again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
