"""What `wafer bench serve` sends and when: synthetic requests with token-exact lengths, and
open-loop arrival times.

Prompts are lists of random token ids, sent as they are (the OpenAI completions API accepts a
list of ids as `prompt`), so the server sees exactly the asked-for input length whatever its
tokenizer: no text is encoded or decoded on either side. Ids are drawn from
[margin, vocab_size - margin), away from both ends of the vocabulary where special tokens live;
`vocab_size` must not exceed the served model's vocabulary (the default, 32000, is below that of
every Llama-2-or-later model and of SmolLM2).

Arrivals follow vLLM's `bench serve`: the gaps between requests are gamma distributed with shape
`burstiness` and mean 1/rate, so burstiness 1 is a Poisson process, below 1 burstier, above 1
more regular; the first request arrives at time 0; rate inf sends every request at once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mesh.errors import WaferError

DEFAULT_VOCAB_SIZE = 32000
# Prompt ids stay this far from both ends of the vocabulary, where the special tokens live (as in
# bench.decode, not imported from there: it loads JAX, which a load generator does not need).
PROMPT_ID_MARGIN = 100


@dataclasses.dataclass(frozen=True)
class Profile:
    """A workload shape: mean input and output lengths in tokens."""

    name: str
    input_len: int
    output_len: int
    about: str


PROFILES = {p.name: p for p in (
    Profile("chat", 256, 128, "chat turns"),
    Profile("prefill-heavy", 2048, 32, "long prompts, short answers, like code-completion traces"),
    Profile("decode-heavy", 256, 1024, "agentic: short prompts, long generations"),
)}


@dataclasses.dataclass(frozen=True)
class Workload:
    """`requests` requests of about `input_len` in / `output_len` out tokens (each length uniform in
    [L (1 - spread), L (1 + spread)], vLLM's --random-range-ratio), ids below `vocab_size`."""

    input_len: int
    output_len: int
    requests: int
    seed: int
    spread: float = 0.0
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self):
        if not 0.0 <= self.spread < 1.0:
            raise WaferError(f"--spread must be in [0, 1), got {self.spread}")
        if self.input_len < 1 or self.output_len < 1:
            raise WaferError(f"input and output lengths must be positive, got {self.input_len} and "
                             f"{self.output_len}")
        if self.vocab_size < 2:
            raise WaferError(f"--vocab-size must be at least 2, got {self.vocab_size}")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request to send: its prompt ids and the exact number of tokens to ask for."""

    index: int
    prompt_ids: tuple[int, ...]
    output_len: int


def _lengths(rng: np.random.Generator, mean: int, spread: float, n: int) -> np.ndarray:
    lo = max(1, math.floor(mean * (1 - spread)))
    hi = max(lo, math.ceil(mean * (1 + spread)))
    return rng.integers(lo, hi + 1, size=n)


def make_requests(w: Workload) -> list[RequestSpec]:
    """The workload's requests, the same for the same seed (so every rate of a sweep sends the
    same prompts)."""
    rng = np.random.default_rng([w.seed, 1])  # a stream apart from the arrivals' ([seed, 0])
    in_lens = _lengths(rng, w.input_len, w.spread, w.requests)
    out_lens = _lengths(rng, w.output_len, w.spread, w.requests)
    margin = PROMPT_ID_MARGIN if w.vocab_size > 4 * PROMPT_ID_MARGIN else 0
    return [RequestSpec(i, tuple(rng.integers(margin, w.vocab_size - margin, size=int(n)).tolist()), int(m))
            for i, (n, m) in enumerate(zip(in_lens, out_lens))]


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds from the start at which each of `n` requests is sent (open loop, vLLM's process).

    Gaps are Gamma(shape=burstiness, scale=1 / (rate * burstiness)): mean 1/rate, coefficient of
    variation 1/sqrt(burstiness). The same seed gives the same pattern at every rate, scaled.
    """
    if not rate > 0:
        raise WaferError(f"the request rate must be positive, got {rate}")
    if not burstiness > 0:
        raise WaferError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng([seed, 0])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])
