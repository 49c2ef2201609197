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
    """When a request arrived, when its output tokens were produced, and when it ended.

    A driver that streams tokens (the live server) keeps every token's time in `token_times`; one
    that only counts them (the simulator) gives `output_tokens` and `first_token` instead and
    leaves `token_times` empty, which is all TTFT, TPOT and end-to-end latency need (ITL needs
    every time). Given `token_times`, the other two are derived from it.
    """

    arrival: float
    token_times: tuple[float, ...]  # one per output token, the first (from prefill) included; () if counted
    finish: float
    output_tokens: int | None = None
    first_token: float | None = None  # the first output token's time

    def __post_init__(self):
        if self.token_times or self.output_tokens is None:
            if self.output_tokens not in (None, len(self.token_times)):
                raise ValueError(f"{self.output_tokens} output tokens but {len(self.token_times)} token times")
            object.__setattr__(self, "output_tokens", len(self.token_times))
            object.__setattr__(self, "first_token", self.token_times[0] if self.token_times else None)
        elif self.output_tokens and self.first_token is None:
            raise ValueError("counted output tokens need the first token's time")


def ttft(times: RequestTimes) -> float:
    """Time to first token: arrival to the first output token."""
    if times.first_token is None:
        raise ValueError("a request without output tokens has no time to first token")
    return times.first_token - times.arrival


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
    if len(t) != times.output_tokens:
        raise ValueError("inter-token latencies need every token's time; these were only counted")
    return tuple(b - a for a, b in zip(t, t[1:]))
