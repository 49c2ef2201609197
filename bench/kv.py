"""`wafer kv export | inspect | import` and `wafer bench kv`: the KV-cache handoff from the command line.

`wafer bench kv` measures, in one run: serialize and deserialize throughput of a realistic cache
(SmolLM2's shape, several thousand tokens of random K/V: throughput does not depend on the values),
this machine's memcpy bandwidth on a buffer of the same size (the bound), their ratio, and the
throughput of the two cross-process transports (TCP on 127.0.0.1 and JAX's transfer), each timed
by the receiving process from the accepted connection to the last verified frame.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.bandwidth import run_seconds
from mesh.errors import WaferError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TIMEOUT_S = 300


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_commands(sub, add_model_args, parser_class) -> None:
    """The `wafer kv` command group."""
    from bench.cli import add_prompt_args
    from bench.mesh_args import add_mesh_args

    kv = sub.add_parser("kv", help="KV-cache handoff: export a prefilled cache, inspect it, decode from it")
    kv_sub = kv.add_subparsers(dest="kv", required=True, parser_class=parser_class)
    exp = kv_sub.add_parser("export", help="prefill a prompt and write its KV cache to a file")
    add_model_args(exp)
    add_prompt_args(exp)
    exp.add_argument("--out", required=True, help="the file to write")
    exp.add_argument("--prefill-mesh", default=None,
                     help="lay the cache out on a prefill mesh of N devices (1xN) or RxC (default: one device)")
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="convert the cache to this dtype on the wire (default: as computed, float32)")
    exp.add_argument("--json", action="store_true", help="print one JSON object")
    exp.set_defaults(run=run_export)

    ins = kv_sub.add_parser("inspect", help="print a cache file's header and per-layer checksums (all verified)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(run=run_inspect)

    imp = kv_sub.add_parser("import", help="land a cache file in a decode slot and continue decoding")
    imp.add_argument("file")
    add_model_args(imp)
    imp.add_argument("--max-new-tokens", type=_positive_int, default=32)
    imp.add_argument("--convert-dtype", action="store_true", help="accept a cache stored in another dtype")
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_args(imp)
    imp.set_defaults(run=run_import)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset whose cache shape is measured")
    p.add_argument("--tokens", type=_positive_int, default=4096, help="cached positions of the sequence")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--skip-transports", action="store_true", help="only the in-process figures")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# --------------------------------------------------------------------------------------- export


def run_export(args) -> int:
    from mesh.executors import Grid

    grid = Grid.parse(args.prefill_mesh) if args.prefill_mesh else Grid(1, 1)
    if grid.cores > 1:
        from mesh.devices import ensure_cpu_devices
        ensure_cpu_devices(grid.cores)
    from bench.cli import check_prompt_args, prompt_ids_from_args
    from kvcache.format import header_for
    from kvcache.sequence import model_fingerprint, prefill_sequence
    from kvcache.transport import write_kv_file
    from model.load import load_model

    check_prompt_args(args)
    loaded = load_model(args.model, args.checkpoint)
    prompt_ids = prompt_ids_from_args(args, loaded)
    seq = prefill_sequence(loaded.params, loaded.config, prompt_ids, prefill_grid=grid)
    header = header_for(seq, loaded.config.name, model_fingerprint(loaded.config, loaded.params), args.dtype)
    t0 = time.perf_counter()
    size = write_kv_file(seq, header, args.out)
    write_s = time.perf_counter() - t0
    report = {"out": args.out, "bytes": size, "model": loaded.config.name, "tokens": seq.length,
              "first_token": seq.first_token, "layers": seq.n_layers, "dtype": header.dtype,
              "prefill_mesh": str(grid), "write_ms": round(write_s * 1e3, 3)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.out}: {size:,} B, {seq.length} tokens x {seq.n_layers} layers of {loaded.config.name} "
              f"({header.dtype}, prefill mesh {grid}), first decode token {seq.first_token}")
    return 0


# -------------------------------------------------------------------------------------- inspect


def run_inspect(args) -> int:
    from kvcache.format import VERSION, frame_checksums
    from kvcache.transport import FileSource

    with FileSource(args.file) as source:
        header, sums = frame_checksums(source)
        size = source.size
    d = {"file": args.file, "bytes": size, "version": VERSION, **header.to_json(),
         "frames": [{"layer": i, "xxh3_64": s} for i, s in enumerate(sums)]}
    if args.json:
        print(json.dumps(d))
        return 0
    lay = header.layout
    print(f"file     {args.file} ({size:,} B), KV-cache format version {VERSION}, every checksum verified")
    print(f"model    {header.model_name}, fingerprint {header.fingerprint}")
    print(f"cache    {header.layers} layers x K/V [{header.kv_heads} KV heads, {header.tokens} tokens, "
          f"head dim {header.head_dim}] {header.dtype}; first decode token {header.first_token}")
    print(f"layout   prefill mesh {lay.grid}, row {lay.row}; B over rows, K over columns (padded to "
          f"{lay.padded_heads}), S and H local; frames carry the logical [K, S, H]")
    for i, s in enumerate(sums):
        print(f"layer {i:3d}  xxh3-64 {s}")
    return 0


# --------------------------------------------------------------------------------------- import


def run_import(args) -> int:
    from bench.mesh_args import make_decoder, setup_mesh

    if args.mesh is None:
        args.mesh = "1x1"
    mesh_setup = setup_mesh(args)
    from kvcache.format import KVReader
    from kvcache.landing import KVLanding
    from kvcache.transport import FileSource
    from model.load import load_model

    with FileSource(args.file) as source:
        reader = KVReader(source)
        header = reader.header
        loaded = load_model(args.model, args.checkpoint)
        cfg = loaded.config
        if header.tokens + args.max_new_tokens > cfg.max_seq_len:
            raise WaferError(f"cache ({header.tokens} tokens) + {args.max_new_tokens} new tokens exceeds the "
                             f"model's context of {cfg.max_seq_len}")
        decoder = make_decoder(loaded, mesh_setup, 1, header.tokens + args.max_new_tokens, True)
        t0 = time.perf_counter()
        slot = KVLanding(decoder, args.convert_dtype).land(reader)
        land_s = time.perf_counter() - t0
    tokens = [header.first_token]
    eos = set(cfg.eos_token_ids)
    compile_s = decoder.compile()
    while len(tokens) < args.max_new_tokens and tokens[-1] not in eos:
        tokens.append(int(decoder.step()[slot]))
    text = loaded.tokenizer.decode(tokens) if loaded.tokenizer is not None else None
    if args.json:
        print(json.dumps({"file": args.file, "model": cfg.name, "mesh": args.mesh, "slot": slot,
                          "cached_tokens": header.tokens, "tokens": tokens, "text": text,
                          "land_ms": round(land_s * 1e3, 3), "compile_s": round(compile_s, 3)}))
    else:
        print(text if text is not None else " ".join(map(str, tokens)))
        print(f"[{len(tokens)} tokens after {header.tokens} cached, mesh {args.mesh}, landed in "
              f"{land_s * 1e3:.1f} ms]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- bench


def measure_memcpy(nbytes: int, runs: int) -> float:
    """Best bytes/s of np.copyto over `nbytes` (each byte read once and written once)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def random_sequence(config, tokens: int):
    """A SequenceKV of `config`'s cache shape with random float32 K/V (1x1 prefill layout)."""
    from kvcache.layout import PrefillKVLayout
    from kvcache.sequence import SequenceKV
    from mesh.executors import Grid

    rng = np.random.default_rng(0)
    shape = (config.n_kv_heads, tokens, config.head_dim)
    k = tuple(rng.standard_normal(shape, np.float32) for _ in range(config.n_layers))
    v = tuple(rng.standard_normal(shape, np.float32) for _ in range(config.n_layers))
    return SequenceKV(k, v, tokens, 0, PrefillKVLayout(Grid(1, 1), config.n_kv_heads))


def _times(fn, runs: int) -> tuple[float, float]:
    """(median, best) seconds of `runs` calls of `fn` after one warm-up call."""
    times = run_seconds(fn, runs)
    return statistics.median(times), min(times)


def _run_peer(mode: str, send) -> dict:
    """Start a receiving process, hand its port to `send(port)`, return its report."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.kv_peer", mode], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        port = json.loads(_read_line(proc))["port"]
        send(port)
        report = json.loads(_read_line(proc))
        proc.wait(timeout=PEER_TIMEOUT_S)
        return report
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _read_line(proc) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], PEER_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise WaferError(f"the receiving process gave no answer: {proc.stderr.read()[-500:]}")
    return line


def run_bench(args) -> int:
    import jax

    from kvcache.format import header_for, read_frames, serialize_kv
    from kvcache.jax_transfer import send_kv_transfer
    from kvcache.transport import send_kv
    from model.config import preset

    load = os.getloadavg()[0]
    config = preset(args.model)
    seq = random_sequence(config, args.tokens)
    header = header_for(seq, f"{config.name} (random K/V)", "0" * 32)
    cache_bytes = header.layers * header.frame_payload_bytes
    memcpy_before = measure_memcpy(cache_bytes, args.repeats)
    # A sender reuses its send buffer, as the memcpy bound reuses its destination; the first
    # serialization into a fresh buffer (page faults included) is reported beside it.
    t0 = time.perf_counter()
    data = serialize_kv(seq, header)
    fresh_s = time.perf_counter() - t0
    out = np.frombuffer(data, np.uint8)
    ser_s, ser_best = _times(lambda: serialize_kv(seq, header, out), args.repeats)
    deser_s, deser_best = _times(lambda: read_frames(data), args.repeats)
    both = cache_bytes / (ser_s + deser_s)
    both_best = cache_bytes / (ser_best + deser_best)
    # Another process's burst can only slow a measurement down: the faster bound is nearer the machine.
    memcpy = max(memcpy_before, measure_memcpy(cache_bytes, args.repeats))
    report = {
        "model": config.name, "cache": f"random K/V of {config.name}'s shape", "tokens": args.tokens,
        "cache_bytes": cache_bytes, "stream_bytes": header.stream_bytes,
        "serialize_GBps": round(cache_bytes / ser_s / 1e9, 2),
        "serialize_best_GBps": round(cache_bytes / ser_best / 1e9, 2),
        "serialize_fresh_buffer_GBps": round(cache_bytes / fresh_s / 1e9, 2),
        "deserialize_GBps": round(cache_bytes / deser_s / 1e9, 2),
        "deserialize_best_GBps": round(cache_bytes / deser_best / 1e9, 2),
        "serialize_plus_deserialize_GBps": round(both / 1e9, 2),
        "memcpy_GBps": round(memcpy / 1e9, 2),
        # Medians against the best memcpy (conservative), and best against best (like with like).
        "ratio_to_memcpy": round(both / memcpy, 3),
        "ratio_best_to_memcpy": round(both_best / memcpy, 3),
        "load_average_1min_at_start": round(load, 2),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    if not args.skip_transports:
        tcp = _run_peer("tcp", lambda port: send_kv(seq, header, port))
        report["tcp_loopback_GBps"] = round(tcp["bytes"] / tcp["seconds"] / 1e9, 2)
        xfer = _run_peer("jax", lambda port: send_kv_transfer(seq, header, port))
        report["jax_transfer_GBps"] = round(xfer["bytes"] / xfer["seconds"] / 1e9, 2)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"cache: {args.tokens} tokens of {config.name} (random K/V), {cache_bytes / 1e6:.1f} MB")
        print(f"serialize {report['serialize_GBps']} GB/s, deserialize {report['deserialize_GBps']} GB/s, "
              f"both {report['serialize_plus_deserialize_GBps']} GB/s = {report['ratio_to_memcpy']} x memcpy "
              f"({report['memcpy_GBps']} GB/s; best runs {report['ratio_best_to_memcpy']} x), medians of "
              f"{args.repeats} runs")
        if not args.skip_transports:
            print(f"TCP loopback {report['tcp_loopback_GBps']} GB/s, JAX transfer {report['jax_transfer_GBps']} GB/s")
    return 0
