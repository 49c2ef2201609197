"""`wafer kv export | inspect | import`: the KV-cache handoff through a file, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cli.flags import (add_dtype_arg, add_mesh_args, add_model_args, add_prompt_args, check_prompt_args, positive_int,
                       prompt_ids_from_args, setup_mesh)
from mesh.errors import WaferError

# --------------------------------------------------------------------------------------- export


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--prefill-mesh", default=None,
                   help="lay the cache out on a prefill mesh of N devices (1xN) or RxC (default: one device)")
    add_dtype_arg(p)
    p.add_argument("--wire-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="convert the cache to this dtype on the wire (default: as computed, the --dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_export(args) -> int:
    from mesh.executors import Grid

    grid = Grid.parse(args.prefill_mesh) if args.prefill_mesh else Grid(1, 1)
    if grid.cores > 1:
        from mesh.devices import ensure_cpu_devices
        ensure_cpu_devices(grid.cores)
    from kvcache.format import header_for
    from kvcache.sequence import model_fingerprint, prefill_sequence
    from kvcache.transport import write_kv_file
    from model.load import load_model

    check_prompt_args(args)
    loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
    prompt_ids = prompt_ids_from_args(args, loaded)
    seq = prefill_sequence(loaded.params, loaded.config, prompt_ids, prefill_grid=grid)
    header = header_for(seq, loaded.config.name, model_fingerprint(loaded.config, loaded.params), args.wire_dtype)
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


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


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


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--convert-dtype", action="store_true",
                   help="accept a cache stored in another dtype than --dtype, converting it explicitly")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_args(p)


def run_import(args) -> int:
    if args.mesh is None:
        args.mesh = "1x1"
    mesh_setup = setup_mesh(args)
    from bench.mesh_setup import make_decoder
    from kvcache.format import KVReader
    from kvcache.landing import KVLanding
    from kvcache.transport import FileSource
    from model.load import load_model

    with FileSource(args.file) as source:
        reader = KVReader(source)
        header = reader.header
        loaded = load_model(args.model, args.checkpoint, dtype=args.dtype)
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
