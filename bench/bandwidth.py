"""This machine's bounds, measured in the benchmark's own run: streaming-read bandwidth and matmul peak.

Decode reads every weight once per step, so its bound is the best rate at which this machine
streams memory into the cores. The bound is the *best* rate any candidate reaches (a slow
candidate says nothing about the machine, only about that loop), so several reads compete: a
jitted reduction, a jitted GEMV (the decode step's own kind of read, multi-threaded by XLA), and
numpy's reduction and GEMV. Each candidate reads well past the last-level cache, warms up once
and reports the median of its timed runs.

The matmul peak is the compute bound: at batch B a decode step does 2·B FLOPs per weight read
(4 bytes), so on a machine with few cores a batch of 8 already meets the compute roof.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mesh.errors import WaferError

# Sizes large enough to defeat any cache (this machine's L3 is 32 MiB), small enough that the
# whole measurement stays within a few seconds.
SUM_BYTES = 512 * 2**20
GEMV_ROWS = 8192
GEMM_N = 2048


@dataclasses.dataclass(frozen=True)
class Rate:
    """One measured candidate: `amount` (bytes or FLOPs) per median run, over `seconds`."""

    name: str
    amount: int
    seconds: float  # median over the timed runs

    @property
    def per_s(self) -> float:
        return self.amount / self.seconds


@dataclasses.dataclass(frozen=True)
class MachineBounds:
    bandwidth: tuple[Rate, ...]  # streaming-read candidates, bytes per run
    matmul: Rate  # FLOPs per run of a square float32 GEMM

    @property
    def best_bandwidth(self) -> Rate:
        return max(self.bandwidth, key=lambda r: r.per_s)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.best_bandwidth.per_s

    @property
    def matmul_flops_per_s(self) -> float:
        return self.matmul.per_s

    def best_with(self, other: MachineBounds) -> MachineBounds:
        """Each candidate's faster measurement of the two: another process's burst of work can
        only slow a measurement down, never speed it up, so the faster one is nearer the machine."""
        def faster(a: Rate, b: Rate) -> Rate:
            return a if a.per_s >= b.per_s else b
        by_name = {r.name: r for r in other.bandwidth}
        return MachineBounds(tuple(faster(r, by_name[r.name]) for r in self.bandwidth),
                             faster(self.matmul, other.matmul))


def run_seconds(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall times of `runs` calls of `fn` after one warm-up call (which also compiles).

    `fn` must block until its result is ready (`jax.block_until_ready` for JAX work).
    """
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median of `run_seconds`."""
    return statistics.median(run_seconds(fn, runs))


def _jax_sum(nbytes: int, runs: int) -> Rate:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = median_seconds(lambda: total(x).block_until_ready(), runs)
    x.delete()
    return Rate("jax_sum", nbytes // 4 * 4, seconds)


def _jax_gemv(rows: int, runs: int) -> Rate:
    w_OI = jnp.ones((rows, rows), jnp.float32)
    x_I = jnp.ones((rows,), jnp.float32)
    gemv = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: gemv(w_OI, x_I).block_until_ready(), runs)
    w_OI.delete()
    return Rate("jax_gemv", rows * rows * 4, seconds)


def _numpy_sum(nbytes: int, runs: int) -> Rate:
    x = np.ones(nbytes // 4, np.float32)
    seconds = median_seconds(x.sum, runs)
    return Rate("numpy_sum", x.nbytes, seconds)


def _numpy_gemv(rows: int, runs: int) -> Rate:
    w_OI = np.ones((rows, rows), np.float32)
    x_I = np.ones(rows, np.float32)
    seconds = median_seconds(lambda: w_OI @ x_I, runs)
    return Rate("numpy_gemv", w_OI.nbytes, seconds)


def _jax_gemm(n: int, runs: int) -> Rate:
    a = jnp.ones((n, n), jnp.float32)
    gemm = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: gemm(a, a).block_until_ready(), runs)
    return Rate(f"jax_gemm_{n}", 2 * n ** 3, seconds)


def _numpy_gemm(n: int, runs: int) -> Rate:
    a = np.ones((n, n), np.float32)
    seconds = median_seconds(lambda: a @ a, runs)
    return Rate("numpy_gemm", 2 * n ** 3, seconds)


def measure_matmul_peak(sizes: tuple[int, ...] = (2048, 4096), runs: int = 3) -> Rate:
    """The best float32 matmul rate this machine reaches: square products through XLA at each of
    `sizes` and through numpy at the smallest, best median wins (prefill's compute bound)."""
    candidates = [_jax_gemm(n, runs) for n in sizes] + [_numpy_gemm(sizes[0], runs)]
    gc.collect()
    return max(candidates, key=lambda r: r.per_s)


def matmul_peak_in_fresh_process(timeout_s: float = 300.0) -> Rate:
    """`measure_matmul_peak` in a new Python process with JAX's default (one CPU device) setup.

    A process that emulates several CPU devices runs the very same products at about half speed
    (measured: 207 against 421 GFLOP/s for XLA, 118 against 218 for numpy, with 4 devices), which
    would flatter every fraction of the bound; the machine's peak is measured where nothing else
    is configured.
    """
    code = ("import json; from bench.bandwidth import measure_matmul_peak as m; "
            "r = m(); print(json.dumps([r.name, r.amount, r.seconds]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise WaferError(f"measuring the matmul peak took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise WaferError(f"measuring the matmul peak failed: {proc.stderr.strip().splitlines()[-1:]}")
    name, amount, seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return Rate(name, amount, seconds)


def measure_machine(sum_bytes: int = SUM_BYTES, gemv_rows: int = GEMV_ROWS, gemm_n: int = GEMM_N,
                    runs: int = 5) -> MachineBounds:
    """Measure the streaming-read candidates and the matmul peak on the default JAX device.

    Args:
      sum_bytes: bytes each reduction reads per run.
      gemv_rows: the GEMVs multiply a [rows, rows] float32 matrix by a vector.
      gemm_n: the matmul peak is timed on an [n, n] @ [n, n] float32 product.
      runs: timed runs per candidate (after one warm-up); each reports its median.
    """
    bandwidth = []
    for measure, size in ((_jax_sum, sum_bytes), (_jax_gemv, gemv_rows),
                          (_numpy_sum, sum_bytes), (_numpy_gemv, gemv_rows)):
        bandwidth.append(measure(size, runs))
        gc.collect()  # each candidate's buffers go before the next one allocates
    return MachineBounds(tuple(bandwidth), _jax_gemm(gemm_n, runs))
