"""The figures of one load run, with the definitions `vllm bench serve` uses (serve/timings.py).

Per successful request: TTFT = first content chunk - arrival; end-to-end latency = last content
chunk - arrival; TPOT = (latency - TTFT) / (output tokens - 1), with the output token count from
the server's usage, so a chunk that carries several tokens still counts each of them; ITL = the
gaps between consecutive content chunks, one gap per chunk however many tokens it carries (vLLM's
rule: ITL is what a streaming user sees, TPOT the per-token rate).

To reuse serve/timings.py, which wants one time per token, a request whose chunk count differs
from its token count gets token times spread linearly over its chunk times; the first and last
stay put, and TTFT, TPOT and latency depend on nothing else.

Each of TTFT, TPOT, ITL and latency is reported in ms as mean, median, p90 and p99 (numpy's
linear percentiles) over the successful requests. Throughputs divide by the run's duration (first
arrival to the end of the last request). Goodput, as vLLM: the successful requests that meet every
given SLO (TTFT, TPOT, latency; a one-token request's TPOT counts as 0), per second. SLO
attainment is the same count over all requests, failures included: the fraction the rate search
holds at >= 90%.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from bench.serve_client import LoadRun, RequestRecord
from mesh.errors import WaferError
from serve.timings import RequestTimes, e2e_latency, itl, tpot, ttft

PERCENTILES = (("median", 50), ("p90", 90), ("p99", 99))
SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2e_ms", "e2e": "e2e_ms"}
# Distinct error messages listed in a report; the rest are counted as "other".
MAX_ERROR_KINDS = 5


@dataclasses.dataclass(frozen=True)
class SLOs:
    """Service-level objectives in ms; None where not set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def parse_slos(items: list[str]) -> SLOs:
    """`["ttft:500", "tpot:50"]` (vLLM's --goodput syntax; keys ttft, tpot, e2el, values in ms)."""
    values = {}
    for item in items:
        key, sep, ms = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise WaferError(f"--goodput takes KEY:MS with KEY one of ttft, tpot, e2el; got {item!r}")
        try:
            v = float(ms)
        except ValueError:
            raise WaferError(f"--goodput {item!r}: {ms!r} is not a number of milliseconds") from None
        if not v > 0 or math.isinf(v):
            raise WaferError(f"--goodput {item!r}: the SLO must be a positive number of ms")
        values[SLO_KEYS[key]] = v
    return SLOs(**values)


def token_times(rec: RequestRecord) -> RequestTimes:
    """The request as serve/timings wants it: one time per output token (see the module doc)."""
    chunks = rec.chunk_times
    n = rec.output_tokens or len(chunks)
    if n == len(chunks):
        times = tuple(chunks)
    else:
        times = tuple(np.interp(np.linspace(0, len(chunks) - 1, n), np.arange(len(chunks)), chunks).tolist())
    return RequestTimes(rec.scheduled, times, rec.finish)


def chunk_gaps(rec: RequestRecord) -> tuple[float, ...]:
    """vLLM's ITL: the gaps between consecutive content chunks."""
    return itl(RequestTimes(rec.scheduled, tuple(rec.chunk_times), rec.finish))


@dataclasses.dataclass(frozen=True)
class RequestLatency:
    """One successful request's latencies in seconds (TPOT None for a single token)."""

    ttft: float
    tpot: float | None
    e2e: float

    def meets(self, slos: SLOs) -> bool:
        checks = ((slos.ttft_ms, self.ttft), (slos.tpot_ms, self.tpot or 0.0), (slos.e2e_ms, self.e2e))
        return all(slo is None or value * 1e3 <= slo for slo, value in checks)


def latency(rec: RequestRecord) -> RequestLatency:
    times = token_times(rec)
    return RequestLatency(ttft(times), tpot(times), e2e_latency(times))


def stats_ms(values_s: list[float]) -> dict | None:
    """mean, median, p90, p99 in ms; None for no values."""
    if not values_s:
        return None
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean": float(np.mean(a))}
    out.update({name: float(np.percentile(a, q)) for name, q in PERCENTILES})
    return {k: round(v, 3) for k, v in out.items()}


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts = collections.Counter(r.error for r in records if not r.ok)
    top = dict(counts.most_common(MAX_ERROR_KINDS))
    rest = sum(counts.values()) - sum(top.values())
    if rest:
        top["other"] = rest
    return top


def request_row(rec: RequestRecord) -> dict:
    """One request as the --per-request list shows it (times in s from the start, latencies in ms)."""
    row = {"index": rec.index, "input_len": rec.input_len, "output_len": rec.output_len,
           "scheduled_s": round(rec.scheduled, 6), "sent_s": None if rec.sent is None else round(rec.sent, 6),
           "status": rec.status, "error": rec.error, "chunks": len(rec.chunk_times), "output_tokens": rec.output_tokens}
    if rec.ok:
        x = latency(rec)
        row.update(ttft_ms=round(x.ttft * 1e3, 3), tpot_ms=None if x.tpot is None else round(x.tpot * 1e3, 3),
                   e2e_ms=round(x.e2e * 1e3, 3))
    return row


def sustained(records: list[RequestRecord], lat: list[RequestLatency]) -> dict:
    """Whether a run measured its rate or a burst: a rate holds only once requests overlap as they
    would in steady state, so the arrivals must span at least as long as a typical request takes
    (the median end-to-end latency). Fewer requests than that measure how a server drains a burst,
    and a rate far past its capacity can then still meet the SLOs."""
    window = max(r.scheduled for r in records) - min(r.scheduled for r in records) if records else 0.0
    e2e = float(np.median([x.e2e for x in lat])) if lat else None
    return {"arrival_window_s": round(window, 3),
            "sustained": None if e2e is None else bool(window >= e2e)}


def summarize(run: LoadRun, rate: float, burstiness: float, slos: SLOs, per_request: bool = False) -> dict:
    """The figures of one run at one rate (one entry of the --json `runs` list); with
    `per_request`, each request's own figures too (for checking a simulator request by request)."""
    done = [r for r in run.records if r.ok]
    lat = [latency(r) for r in done]
    d = run.duration
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.input_len for r in done)
    good = sum(1 for x in lat if x.meets(slos)) if slos else None
    out = {
        "rate": round(rate, 4) if math.isfinite(rate) else "inf",  # JSON has no inf
        "burstiness": burstiness,
        "requests": len(run.records),
        "completed": len(done),
        "failed": len(run.records) - len(done),
        "errors": error_counts(run.records),
        # Requests that got fewer tokens than asked (ignore_eos not honoured) or whose prompt the
        # server counted differently: either makes the lengths, and so the figures, not what was asked.
        "short_outputs": sum(1 for r in done if r.output_tokens < r.output_len),
        "prompt_len_mismatches": sum(1 for r in done if r.prompt_tokens is not None and r.prompt_tokens != r.input_len),
        "duration_s": round(d, 4),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": round(len(done) / d, 4) if d > 0 else None,
        "output_throughput": round(out_tokens / d, 3) if d > 0 else None,
        "total_token_throughput": round((in_tokens + out_tokens) / d, 3) if d > 0 else None,
        "ttft_ms": stats_ms([x.ttft for x in lat]),
        "tpot_ms": stats_ms([x.tpot for x in lat if x.tpot is not None]),
        "itl_ms": stats_ms([g for r in done for g in chunk_gaps(r)]),
        "e2e_ms": stats_ms([x.e2e for x in lat]),
        "good_requests": good,
        "goodput": round(good / d, 4) if good is not None and d > 0 else None,
        "slo_attainment": round(good / len(run.records), 4) if good is not None and run.records else None,
        **sustained(run.records, lat),
    }
    if per_request:
        out["per_request"] = [request_row(r) for r in run.records]
    return out
