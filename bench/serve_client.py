"""The HTTP side of `wafer bench serve`: streamed completions against any OpenAI-compatible URL,
sent open loop at given times, each token chunk time-stamped as it arrives.

Each request is `POST /v1/completions` with the prompt as token ids, `max_tokens`,
`ignore_eos: true` (so the output length is exact), `temperature: 0`, `stream: true` and
`stream_options: {"include_usage": true}`. A request's clock starts at its scheduled send time,
not when the client got round to sending it: time spent waiting for a free `--max-concurrency`
slot, or lost to a late event loop, is the user's wait and counts in TTFT (vLLM starts the clock
when the request is sent; open loop means the schedule, so we do not).

A content chunk is a server-sent event with non-empty `choices` (vLLM's rule: a chunk whose text
is empty still counts). The output token count is the server's `usage.completion_tokens` (the last
one seen) or, without usage, the number of content chunks.

Around each run the client also reads the server's own worker times from `GET /metrics` where the
server has them (`wafer serve`'s histograms of prefill batches, decode steps and KV handoffs), so
a report says how fast the workers ran during the run, not only what the users saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Callable

import aiohttp
import numpy as np

from bench.serve_workload import RequestSpec
from mesh.errors import WaferError

# Bytes of an error body kept in a record: enough for an OpenAI error message.
ERROR_BODY_CHARS = 300


@dataclasses.dataclass(frozen=True)
class Target:
    """Where requests go and how long the client waits: `connect_timeout` to open a connection,
    `read_timeout` between two reads of a response (a stalled stream fails after that)."""

    url: str
    model: str
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_concurrency: int | None = None

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                     sock_connect=self.connect_timeout, sock_read=self.read_timeout)


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request. Times are seconds from the start of the run (perf_counter)."""

    index: int
    input_len: int
    output_len: int  # asked for
    scheduled: float  # the arrival: its place in the open-loop schedule
    sent: float | None = None
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    finish: float | None = None  # last content chunk, as vLLM's latency
    output_tokens: int | None = None  # usage.completion_tokens, else the number of chunks
    prompt_tokens: int | None = None  # usage.prompt_tokens, when the server reports it
    status: int | None = None  # HTTP status
    error: str | None = None  # None when the request succeeded

    @property
    def ok(self) -> bool:
        return self.error is None


def base_url(url: str) -> str:
    """The server's root: `http://host:8000/v1/` and `http://host:8000` name the same server."""
    return url.rstrip("/").removesuffix("/v1")


def completions_url(url: str) -> str:
    return base_url(url) + "/v1/completions"


def _describe(e: BaseException, target: Target | None = None) -> str:
    if isinstance(e, aiohttp.ConnectionTimeoutError) and target is not None:
        return f"timed out connecting ({target.connect_timeout:g} s, --connect-timeout)"
    if isinstance(e, asyncio.TimeoutError):
        return ("timed out waiting for the server" +
                (f" (silent for {target.read_timeout:g} s, --read-timeout)" if target is not None else ""))
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI error body, else the body itself (cut short)."""
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            body = str(message)
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:ERROR_BODY_CHARS]


class ServerUnreachable(WaferError):
    """No HTTP answer at all: refused, unresolvable, or silent past the timeout."""


async def fetch_models(url: str, timeout: float = 10.0) -> list[str]:
    """The model ids of GET /v1/models: ServerUnreachable without an HTTP answer, WaferError for an
    answer that is not a model list."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(base_url(url) + "/v1/models") as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise WaferError(f"GET {base_url(url)}/v1/models answered HTTP {resp.status}: "
                                     f"{_error_message(body)}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise ServerUnreachable(f"cannot reach the server at {url}: {_describe(e)}") from None
    try:
        data = json.loads(body).get("data") or []
        return [m["id"] for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError):
        raise WaferError(f"GET {base_url(url)}/v1/models did not answer a model list") from None


# The worker histograms of `wafer serve` (serve/metrics.py) a report reads, by the name it gives them.
WORKER_HISTOGRAMS = {"prefill_batch": "wafer_prefill_batch_seconds", "decode_step": "wafer_decode_step_seconds",
                     "handoff": "wafer_kv_handoff_seconds"}


async def _fetch_worker_times(url: str, timeout: float) -> dict | None:
    from prometheus_client.parser import text_string_to_metric_families
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(base_url(url) + "/metrics") as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    sums = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sample.value
    out = {}
    for key, name in WORKER_HISTOGRAMS.items():
        if f"{name}_count" in sums:
            out[key] = (sums[f"{name}_count"], sums[f"{name}_sum"])
    return out or None


def fetch_worker_times(url: str, timeout: float = 10.0) -> dict | None:
    """{"prefill_batch" | "decode_step" | "handoff": (count, total seconds)} from the server's
    `/metrics` so far, or None from a server without them (another vendor's, or unreachable: the
    run itself reports that)."""
    try:
        return asyncio.run(_fetch_worker_times(url, timeout))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


def worker_times_between(before: dict | None, after: dict | None) -> dict | None:
    """What the workers did between two `fetch_worker_times`: per histogram, the count and the
    mean in ms (None where nothing was observed)."""
    if not before or not after:
        return None
    out = {}
    for key, (n1, s1) in after.items():
        n0, s0 = before.get(key, (0.0, 0.0))
        n = int(round(n1 - n0))
        out[key] = {"count": n, "mean_ms": round(1e3 * (s1 - s0) / n, 3) if n > 0 else None}
    return out


def payload(target: Target, spec: RequestSpec) -> dict:
    return {
        "model": target.model,
        "prompt": list(spec.prompt_ids),
        "max_tokens": spec.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_request(session: aiohttp.ClientSession, target: Target, spec: RequestSpec, rec: RequestRecord,
                       clock: Callable[[], float]) -> None:
    """Send one streamed completion and fill `rec` as its chunks arrive; never raises for a
    failure of the server or the network (the record says what went wrong)."""
    rec.sent = clock()
    try:
        async with session.post(completions_url(target.url), json=payload(target, spec)) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):  # blank lines, keep-alive comments, other SSE fields
                    continue
                data = line.removeprefix(b"data:").strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if not isinstance(event, dict):
                    rec.error = f"not an event object in the stream: {_error_message(data.decode(errors='replace'))}"
                    return
                if event.get("error"):
                    rec.error = f"error in stream: {_error_message(json.dumps(event))}"
                    return
                if event.get("choices"):
                    rec.chunk_times.append(clock())
                usage = event.get("usage")
                if usage:  # the final usage chunk, or per-chunk usage from servers that send it
                    rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
                    rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        rec.error = _describe(e, target)
        return
    if not rec.chunk_times:
        rec.error = "the stream ended without a token"
        return
    rec.finish = rec.chunk_times[-1]
    if not rec.output_tokens:
        rec.output_tokens = len(rec.chunk_times)


@dataclasses.dataclass
class LoadRun:
    records: list[RequestRecord]
    duration: float  # first scheduled arrival to the end of the last request


async def _run_load(target: Target, specs: list[RequestSpec], arrivals: np.ndarray,
                    on_done: Callable[[RequestRecord], None]) -> LoadRun:
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    limit = asyncio.Semaphore(target.max_concurrency) if target.max_concurrency else None
    # No connection cap of aiohttp's own (its default is 100): --max-concurrency is the only limit.
    connector = aiohttp.TCPConnector(limit=0)
    records = [RequestRecord(s.index, len(s.prompt_ids), s.output_len, float(t)) for s, t in zip(specs, arrivals)]

    async def one(session, spec, rec):
        if limit is None:
            await send_request(session, target, spec, rec, clock)
        else:
            async with limit:
                await send_request(session, target, spec, rec, clock)
        on_done(rec)

    async with aiohttp.ClientSession(timeout=target.client_timeout(), connector=connector) as session:
        tasks = []
        for spec, rec in zip(specs, records):
            delay = rec.scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, spec, rec)))
        await asyncio.gather(*tasks)
    return LoadRun(records, clock())


def run_load(target: Target, specs: list[RequestSpec], arrivals: np.ndarray,
             on_done: Callable[[RequestRecord], None] = lambda rec: None) -> LoadRun:
    """Send `specs[i]` at `arrivals[i]` seconds from now, all streamed, and wait for every one."""
    return asyncio.run(_run_load(target, specs, arrivals, on_done))
