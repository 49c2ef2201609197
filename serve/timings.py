"""Per-request timestamps and the latency metrics `vllm bench serve` computes from them.

The definitions (vLLM's benchmarks/serve): TTFT is arrival to first token; end-to-end latency is
arrival to finish; TPOT = (latency - TTFT) / (output tokens - 1), defined only for requests with
at least two output tokens (vLLM leaves the others out of TPOT statistics, and counts their TPOT
as 0 when it checks goodput); ITL is the list of gaps between consecutive tokens. Times are floats
in seconds on whatever clock the driver uses (wall or simulated).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RequestTimes:
    """When a request arrived, when each of its output tokens was produced, and when it ended."""

    arrival: float
    token_times: tuple[float, ...]  # one per output token, the first (from prefill) included
    finish: float

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)


def ttft(times: RequestTimes) -> float:
    """Time to first token: arrival to the first output token."""
    if not times.token_times:
        raise ValueError("a request without output tokens has no time to first token")
    return times.token_times[0] - times.arrival


def e2e_latency(times: RequestTimes) -> float:
    """End-to-end latency: arrival to the end of the request."""
    return times.finish - times.arrival


def tpot(times: RequestTimes) -> float | None:
    """Time per output token after the first; None for fewer than two tokens (vLLM skips those)."""
    if times.output_tokens < 2:
        return None
    return (e2e_latency(times) - ttft(times)) / (times.output_tokens - 1)


def itl(times: RequestTimes) -> tuple[float, ...]:
    """Inter-token latencies: the gap before each token after the first."""
    t = times.token_times
    return tuple(b - a for a, b in zip(t, t[1:]))
