"""Streaming statistics with bounded memory: a fixed-bucket log histogram for latency percentiles.

A million-request simulation cannot keep every latency, so each metric is a histogram with a
fixed number of logarithmic buckets (`per_decade` per factor of ten between `lo` and `hi`, plus
an underflow and an overflow bucket). A quantile is the geometric centre of its bucket, clamped
to the exact minimum and maximum, so its relative error is at most half a bucket width:
10**(1 / (2 * per_decade)) - 1, 0.58% at the default 200 buckets per decade. The count, sum, min
and max are exact. Values are buffered in a plain list and binned with numpy in blocks, which
keeps the per-value cost to a list append.
"""

from __future__ import annotations

import math

import numpy as np

_FLUSH = 1 << 16  # values buffered before they are binned


class LogHistogram:
    """Positive values in log buckets from `lo` to `hi`; zeros and values below `lo` underflow."""

    def __init__(self, lo: float = 1e-6, hi: float = 1e6, per_decade: int = 200):
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
        self.lo, self.hi, self.per_decade = lo, hi, per_decade
        self._log_lo = math.log10(lo)
        self._buckets = int(math.ceil((math.log10(hi) - self._log_lo) * per_decade))
        self.counts = np.zeros(self._buckets + 2, np.int64)  # [underflow, buckets..., overflow]
        self._pending: list[float] = []
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: float) -> None:
        self._pending.append(x)
        if len(self._pending) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        v = np.asarray(self._pending, np.float64)
        self._pending = []
        self.count += v.size
        self.total += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        with np.errstate(divide="ignore"):
            idx = np.floor((np.log10(np.maximum(v, 0.0)) - self._log_lo) * self.per_decade) + 1
        idx = np.clip(np.nan_to_num(idx, neginf=0.0), 0, self._buckets + 1).astype(np.int64)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def merge(self, other: LogHistogram) -> None:
        """Add `other`'s values (same buckets) to this histogram."""
        if (other.lo, other.hi, other.per_decade) != (self.lo, self.hi, self.per_decade):
            raise ValueError("histograms with different buckets do not merge")
        self._flush()
        other._flush()
        self.counts += other.counts
        self.count += other.count
        self.total += other.total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    @property
    def mean(self) -> float | None:
        self._flush()
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1), within half a bucket; None when empty."""
        self._flush()
        if not self.count:
            return None
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        rank = max(1, math.ceil(q * self.count))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        if i == 0:
            centre = self.min
        elif i == self._buckets + 1:
            centre = self.max
        else:
            centre = 10 ** (self._log_lo + (i - 0.5) / self.per_decade)
        return min(max(centre, self.min), self.max)

    def summary(self, quantiles=(0.5, 0.9, 0.99)) -> dict[str, float | None]:
        """mean, p50/p90/p99 (or the quantiles asked for), min, max, count."""
        self._flush()
        out: dict[str, float | None] = {"mean": self.mean}
        for q in quantiles:
            out[f"p{q * 100:g}"] = self.quantile(q)
        out["min"] = self.min if self.count else None
        out["max"] = self.max if self.count else None
        out["count"] = self.count
        return out
