"""`wafer bench kv`: the KV-cache handoff's throughput against this machine's memcpy.

One run measures: serialize and deserialize throughput of a realistic cache (SmolLM2's shape,
several thousand tokens of random K/V: throughput does not depend on the values), this machine's
memcpy bandwidth on a buffer of the same size (the bound), their ratio, and the throughput of the
two cross-process transports (TCP on 127.0.0.1 and JAX's transfer), each timed by the receiving
process from the accepted connection to the last verified frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time

import numpy as np

from mesh.errors import WaferError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class KVBench:
    """What one run measures: the cache of preset `model` over `tokens` positions, `repeats` timed
    runs of each in-process figure, and the two transports unless `skip_transports`."""

    model: str
    tokens: int
    repeats: int
    skip_transports: bool
    # The cache's dtypes, each measured in this run (the first also over the transports); the
    # report's top-level figures are the first's, `by_dtype` holds every one's.
    dtypes: tuple[str, ...] = ("float32",)


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


def random_sequence(config, tokens: int, dtype: str = "float32"):
    """A SequenceKV of `config`'s cache shape with random K/V in `dtype` (1x1 prefill layout)."""
    from kvcache.layout import PrefillKVLayout
    from kvcache.sequence import SequenceKV
    from mesh.executors import Grid

    from model.dtypes import resolve_dtype

    rng = np.random.default_rng(0)
    shape = (config.n_kv_heads, tokens, config.head_dim)
    dt = resolve_dtype(dtype)
    k = tuple(rng.standard_normal(shape, np.float32).astype(dt) for _ in range(config.n_layers))
    v = tuple(rng.standard_normal(shape, np.float32).astype(dt) for _ in range(config.n_layers))
    return SequenceKV(k, v, tokens, 0, PrefillKVLayout(Grid(1, 1), config.n_kv_heads))


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


def run_kv_bench(bench: KVBench) -> dict:
    """Measure everything above; return the report (the --json object)."""
    import jax

    from kvcache.format import header_for
    from kvcache.jax_transfer import send_kv_transfer
    from kvcache.transport import send_kv
    from model.config import preset

    load = os.getloadavg()[0]
    config = preset(bench.model)
    seqs = {dt: random_sequence(config, bench.tokens, dt) for dt in bench.dtypes}
    headers = {dt: header_for(seq, f"{config.name} (random K/V)", "0" * 32) for dt, seq in seqs.items()}
    largest = max(h.layers * h.frame_payload_bytes for h in headers.values())
    memcpy_before = measure_memcpy(largest, bench.repeats)
    codecs = {dt: _Codec(seqs[dt], headers[dt]) for dt in bench.dtypes}
    for _ in range(bench.repeats):
        for codec in codecs.values():
            codec.time_once()
    figures = {dt: codec.figures() for dt, codec in codecs.items()}
    # Another process's burst can only slow a measurement down: the faster bound is nearer the machine.
    memcpy = max(memcpy_before, measure_memcpy(largest, bench.repeats))
    for f in figures.values():
        # Medians against the best memcpy (conservative), and best against best (like with like).
        f["ratio_to_memcpy"] = round(f.pop("_both") / memcpy, 3)
        f["ratio_best_to_memcpy"] = round(f.pop("_both_best") / memcpy, 3)
    first = bench.dtypes[0]
    seq, header = seqs[first], headers[first]
    report = {
        "model": config.name, "cache": f"random K/V of {config.name}'s shape", "tokens": bench.tokens,
        "dtype": first, **figures[first],
        "memcpy_GBps": round(memcpy / 1e9, 2),
        "load_average_1min_at_start": round(load, 2),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    if not bench.skip_transports:
        tcp = _run_peer("tcp", lambda port: send_kv(seq, header, port))
        report["tcp_loopback_GBps"] = round(tcp["bytes"] / tcp["seconds"] / 1e9, 2)
        xfer = _run_peer("jax", lambda port: send_kv_transfer(seq, header, port))
        report["jax_transfer_GBps"] = round(xfer["bytes"] / xfer["seconds"] / 1e9, 2)
    if len(bench.dtypes) > 1:
        report["by_dtype"] = figures
        # Against the first dtype: the stream's bytes, and the codec's rate in bytes/s (a 16-bit
        # stream within 10% of float32's rate carries its half of the bytes in about half the time).
        report["vs_first"] = {dt: {"stream_bytes": round(f["stream_bytes"] / figures[first]["stream_bytes"], 3),
                                   "serialize_plus_deserialize_GBps": round(
                                       f["serialize_plus_deserialize_GBps"]
                                       / figures[first]["serialize_plus_deserialize_GBps"], 3)}
                              for dt, f in figures.items()}
    return report


class _Codec:
    """Serialize and deserialize timings of one cache, taken one run at a time so that several
    dtypes' runs interleave (a load that drifts during the run then weighs on each alike)."""

    def __init__(self, seq, header):
        from kvcache.format import read_frames, serialize_kv

        self.cache_bytes = header.layers * header.frame_payload_bytes
        self.stream_bytes = header.stream_bytes
        # A sender reuses its send buffer, as the memcpy bound reuses its destination; the first
        # serialization into a fresh buffer (page faults included) is reported beside it.
        t0 = time.perf_counter()
        data = serialize_kv(seq, header)
        self.fresh_s = time.perf_counter() - t0
        out = np.frombuffer(data, np.uint8)
        self.serialize = lambda: serialize_kv(seq, header, out)
        self.deserialize = lambda: read_frames(data)
        self.deserialize()  # warm-up, as the serialization above was
        self.ser, self.deser = [], []

    def time_once(self) -> None:
        for fn, times in ((self.serialize, self.ser), (self.deserialize, self.deser)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)

    def figures(self) -> dict:
        ser_s, ser_best = statistics.median(self.ser), min(self.ser)
        deser_s, deser_best = statistics.median(self.deser), min(self.deser)
        n = self.cache_bytes
        return {
            "cache_bytes": n, "stream_bytes": self.stream_bytes,
            "serialize_GBps": round(n / ser_s / 1e9, 2),
            "serialize_best_GBps": round(n / ser_best / 1e9, 2),
            "serialize_fresh_buffer_GBps": round(n / self.fresh_s / 1e9, 2),
            "deserialize_GBps": round(n / deser_s / 1e9, 2),
            "deserialize_best_GBps": round(n / deser_best / 1e9, 2),
            "serialize_plus_deserialize_GBps": round(n / (ser_s + deser_s) / 1e9, 2),
            "serialize_plus_deserialize_ms": round((ser_s + deser_s) * 1e3, 3),
            "_both": n / (ser_s + deser_s), "_both_best": n / (ser_best + deser_best),
        }


def format_report(r: dict, repeats: int) -> str:
    """The report as lines for a terminal (`repeats`: the timed runs behind each median)."""
    lines = [f"cache: {r['tokens']} tokens of {r['model']} (random K/V), {r['cache_bytes'] / 1e6:.1f} MB",
             f"serialize {r['serialize_GBps']} GB/s, deserialize {r['deserialize_GBps']} GB/s, "
             f"both {r['serialize_plus_deserialize_GBps']} GB/s = {r['ratio_to_memcpy']} x memcpy "
             f"({r['memcpy_GBps']} GB/s; best runs {r['ratio_best_to_memcpy']} x), medians of {repeats} runs"]
    for dt, f in r.get("by_dtype", {}).items():
        vs = r["vs_first"][dt]
        lines.append(f"  {dt:9s} stream {f['stream_bytes'] / 1e6:.1f} MB ({vs['stream_bytes']} x {r['dtype']}), "
                     f"serialize+deserialize {f['serialize_plus_deserialize_GBps']} GB/s "
                     f"({vs['serialize_plus_deserialize_GBps']} x {r['dtype']}'s), "
                     f"{f['serialize_plus_deserialize_ms']} ms")
    if "tcp_loopback_GBps" in r:
        lines.append(f"TCP loopback {r['tcp_loopback_GBps']} GB/s, JAX transfer {r['jax_transfer_GBps']} GB/s")
    return "\n".join(lines)
