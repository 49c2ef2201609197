"""Workloads for the fleet simulator: arrival times with prompt and output lengths, as arrays.

A workload is three equal-length numpy arrays (arrival seconds, non-decreasing; prompt tokens;
output tokens), so a million requests cost 24 MB and no Python object each until they arrive.

- `synthetic`: Poisson arrivals at a rate (exponential gaps), or gamma gaps with a shape
  (`burstiness` < 1 is burstier than Poisson, > 1 smoother; 1 is Poisson), lengths fixed or drawn
  around their means (exponential, or uniform on [mean/2, 3 mean/2]).
- `read_azure_trace`: the format of Azure's public LLM inference traces (CSV with header
  `TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps like `2023-11-16 18:15:46.6805900`).
  Asking for more requests than the trace holds replays it back to back.

`PROFILES` are the three mixes of the serving issue: chat, prefill-heavy code completion, and a
decode-heavy agentic mix with about 15x chat's output.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import enum
import pathlib

import numpy as np

from mesh.errors import WaferError

TRACE_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "azure-llm-2023"
TRACES = {"code": TRACE_DIR / "code.csv", "conv": TRACE_DIR / "conv.csv"}
TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class LengthDist(enum.Enum):
    FIXED = "fixed"
    EXPONENTIAL = "exponential"  # mean as given, at least 1
    UNIFORM = "uniform"  # on [mean/2, 3 mean/2]


@dataclasses.dataclass(frozen=True)
class Profile:
    input_len: int
    output_len: int


PROFILES = {"chat": Profile(256, 128), "code": Profile(2048, 32), "agentic": Profile(256, 1920)}


@dataclasses.dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # [requests] float64, non-decreasing
    prompt_len: np.ndarray  # [requests] int64, >= 1
    output_len: np.ndarray  # [requests] int64, >= 1
    name: str = ""

    def __post_init__(self):
        n = len(self.arrival_s)
        if not len(self.prompt_len) == len(self.output_len) == n:
            raise ValueError("arrivals, prompt and output lengths differ in length")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0


def _lengths(rng: np.random.Generator, mean: int, n: int, dist: LengthDist) -> np.ndarray:
    if mean < 1:
        raise WaferError(f"a mean length must be at least 1, got {mean}")
    if dist is LengthDist.FIXED:
        return np.full(n, mean, np.int64)
    if dist is LengthDist.EXPONENTIAL:
        x = rng.exponential(mean, n)
    else:
        x = rng.uniform(mean / 2, 1.5 * mean, n)
    return np.maximum(1, np.rint(x)).astype(np.int64)


def synthetic(requests: int, rate: float, input_len: int, output_len: int, seed: int = 0,
              burstiness: float = 1.0, length_dist: LengthDist = LengthDist.FIXED, name: str = "") -> Workload:
    """`requests` arrivals at `rate` per second (gamma gaps of shape `burstiness`; 1 is Poisson)."""
    if requests < 1 or not rate > 0 or not burstiness > 0:
        raise WaferError(f"need requests >= 1, rate > 0 and burstiness > 0 (got {requests}, {rate}, {burstiness})")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), requests)
    gaps[0] = 0.0
    return Workload(np.cumsum(gaps), _lengths(rng, input_len, requests, length_dist),
                    _lengths(rng, output_len, requests, length_dist), name or f"synthetic {input_len}/{output_len}")


def _timestamp(text: str) -> float:
    # Seven fractional digits (100 ns ticks) are one more than datetime reads: cut to microseconds.
    day, _, frac = text.strip().partition(".")
    t = datetime.datetime.strptime(day, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return t.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def read_azure_trace(path: str | pathlib.Path, requests: int | None = None, time_scale: float = 1.0) -> Workload:
    """Read an Azure LLM inference trace; arrivals start at 0 and are multiplied by `time_scale`
    (0.5 doubles the rate). Zero lengths are raised to 1 (the scheduler needs one of each).
    `requests` beyond the trace's length replay it back to back, each copy starting one mean gap
    after the previous one ends."""
    path = pathlib.Path(TRACES.get(str(path), path))
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            if tuple(h.strip() for h in header) != TRACE_COLUMNS:
                raise WaferError(f"trace {path}: header {header}, expected {','.join(TRACE_COLUMNS)}")
            rows = [(_timestamp(r[0]), int(r[1]), int(r[2])) for r in reader if r]
    except (OSError, ValueError, IndexError, StopIteration) as e:
        raise WaferError(f"trace {path}: {e}") from None
    if not rows:
        raise WaferError(f"trace {path} holds no requests")
    rows.sort(key=lambda r: r[0])
    t = np.array([r[0] for r in rows]) - rows[0][0]
    prompt = np.maximum(1, np.array([r[1] for r in rows], np.int64))
    output = np.maximum(1, np.array([r[2] for r in rows], np.int64))
    n = len(t) if requests is None else requests
    if n < 1:
        raise WaferError(f"requests must be at least 1, got {n}")
    copies = -(-n // len(t))
    if copies > 1:
        period = t[-1] + (t[-1] / max(1, len(t) - 1))
        t = np.concatenate([t + i * period for i in range(copies)])
        prompt, output = np.tile(prompt, copies), np.tile(output, copies)
    return Workload(t[:n] * time_scale, prompt[:n], output[:n], path.stem)



def bench_report_run(path: str | pathlib.Path, rate: float | None = None) -> dict:
    """One run (one rate) of a `wafer bench serve --json --per-request` report, with its
    per-request rows; a report of several rates needs `rate`."""
    import json
    import math

    path = pathlib.Path(path)
    try:
        runs = json.loads(path.read_text())["runs"]
        rates = [r["rate"] for r in runs]
        if rate is None:
            if len(runs) != 1:
                raise WaferError(f"{len(runs)} runs (rates {rates}): choose one with --replay-rate")
            run = runs[0]
        else:
            found = [r for r in runs if r["rate"] != "inf" and math.isclose(float(r["rate"]), rate, rel_tol=1e-3)]
            if not found:
                raise WaferError(f"no run at rate {rate:g} (rates {rates})")
            run = found[0]
        if not isinstance(run.get("per_request"), list):
            raise WaferError("no per-request rows: write it with wafer bench serve --json --per-request")
        return run
    except WaferError as e:
        raise WaferError(f"bench report {path}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WaferError(f"bench report {path}: {type(e).__name__}: {e}") from None


def read_bench_report(path: str | pathlib.Path, rate: float | None = None) -> Workload:
    """The requests one run of `wafer bench serve --json --per-request` sent: each one's arrival
    (seconds from the run's start), prompt and output lengths, so the simulator replays exactly
    that load (`bench_report_run` picks the run)."""
    run = bench_report_run(path, rate)
    if not run["per_request"]:
        raise WaferError(f"bench report {path}: the run holds no requests")
    try:
        rows = sorted(run["per_request"], key=lambda r: (r["scheduled_s"], r["index"]))
        t = np.array([float(r["scheduled_s"]) for r in rows], np.float64)
        prompt = np.array([int(r["input_len"]) for r in rows], np.int64)
        output = np.array([int(r["output_len"]) for r in rows], np.int64)
    except (ValueError, KeyError, TypeError) as e:
        raise WaferError(f"bench report {path}: a per-request row: {type(e).__name__}: {e}") from None
    if t.min() < 0 or prompt.min() < 1 or output.min() < 1:
        raise WaferError(f"bench report {path}: negative arrival times or lengths below 1")
    return Workload(t - t[0], prompt, output, f"replay of {pathlib.Path(path).name} at rate {run['rate']}")
