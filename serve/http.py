"""The OpenAI-compatible HTTP front end (aiohttp): completions and chat, streamed or not, models,
health and Prometheus metrics.

A request becomes token ids (serve/api_params.py), runs on the `Engine`, and its tokens come back
as text through the incremental detokenizer, cut at stop strings here (the engine never sees
text). Streaming answers are server-sent events shaped as OpenAI's and vLLM's: one
`data: {json}` chunk per text delta (the last one carrying the finish reason), a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.

A streamed response starts only once the engine's first output is in, so a request refused at
admission (queue full) still gets its proper status (429 with Retry-After), streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mesh.errors import WaferError
from model.tokenizer import TextTokenizer
from serve.api_params import ApiError, Limits, ParsedRequest, parse_chat, parse_completion
from serve.detokenize import IncrementalDetokenizer, StopStrings
from serve.events import FailReason, FinishReason
from serve.metrics import ServeMetrics
from serve.requests import Done, Engine, Failed, GenerateRequest, TokenOut
from serve.timings import e2e_latency, tpot, ttft

log = logging.getLogger(__name__)

# Longest wait for the engine's next output of a request, a safety net under the engine's own
# stage deadlines (serve/events.py Deadlines: queue, prefill and handoff 60 s each, tokens 30 s).
OUTPUT_TIMEOUT_S = 300.0
# After a stop string, the engine still owes the request's Done (with its timings, for the
# metrics); the client already has its answer, so this only bounds how long the handler waits.
DRAIN_AFTER_STOP_S = 30.0
FAIL_STATUS = {
    FailReason.QUEUE_FULL: 429,
    FailReason.WORKER_DIED: 503,
    FailReason.DEADLINE: 504,
}
END = object()  # the engine's stream of a request ended
TIMEOUT = object()  # no output within the wait
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class FrontEnd:
    """What every handler shares: the engine, the tokenizer, the served name, the metrics, and
    the count of requests in flight (shutdown waits for it to reach zero)."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, model_name: str, metrics: ServeMetrics,
                 output_timeout_s: float = OUTPUT_TIMEOUT_S):
        self.engine = engine
        self.output_timeout_s = output_timeout_s
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.created = int(time.time())
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False  # shutting down: new generation requests get 503

    @property
    def limits(self) -> Limits:
        return Limits(self.engine.config.vocab_size, self.engine.capacity)


FRONT_END = web.AppKey("front_end", FrontEnd)


def make_app(engine: Engine, tokenizer: TextTokenizer, model_name: str, metrics: ServeMetrics,
             output_timeout_s: float = OUTPUT_TIMEOUT_S) -> web.Application:
    """The aiohttp application serving `engine` under the name `model_name`.

    output_timeout_s: a request whose engine sends nothing for this long is cancelled (504).
    """
    app = web.Application(middlewares=[error_middleware], client_max_size=16 * 1024 * 1024)
    app[FRONT_END] = FrontEnd(engine, tokenizer, model_name, metrics, output_timeout_s)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_text)
    return app


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error a client sees is an OpenAI error body; none carries a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:  # aiohttp's own: unknown route (404), wrong method (405), body too large
        if e.status < 400:
            raise
        return error_response(ApiError(e.status, e.reason, type="invalid_request_error"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal server error", type="server_error"))


# ---------------------------------------------------------------------------------- plain routes


async def models(request: web.Request) -> web.Response:
    fe = request.app[FRONT_END]
    return web.json_response({"object": "list", "data": [{
        "id": fe.model_name, "object": "model", "created": fe.created, "owned_by": "wafer",
        "root": fe.model_name, "parent": None, "max_model_len": fe.engine.capacity,
    }]})


async def health(request: web.Request) -> web.Response:
    fe = request.app[FRONT_END]
    if fe.engine.state().ready and not fe.draining:
        return web.Response(status=200)
    return error_response(ApiError(503, "the engine is not ready", type="server_error", code="not_ready"))


async def metrics_text(request: web.Request) -> web.Response:
    fe = request.app[FRONT_END]
    state = fe.engine.state()
    fe.metrics.queue_depth.set(state.waiting)
    fe.metrics.slots_in_use.set(state.slots_in_use)
    return web.Response(body=generate_latest(fe.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ------------------------------------------------------------------------------ generation routes


async def completions(request: web.Request) -> web.StreamResponse:
    fe = request.app[FRONT_END]
    parsed = parse_completion(await _json_body(request), fe.tokenizer, fe.model_name, fe.limits)
    return await _generate(request, fe, parsed, CompletionFormat(f"cmpl-{uuid.uuid4().hex}", fe.model_name))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    fe = request.app[FRONT_END]
    parsed = parse_chat(await _json_body(request), fe.tokenizer, fe.model_name, fe.limits)
    return await _generate(request, fe, parsed, ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", fe.model_name))


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


class CompletionFormat:
    """Bodies and chunks of /v1/completions."""

    def __init__(self, request_id: str, model: str):
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, stop_reason: str | None, usage: dict) -> dict:
        return {**self._head(), "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason, "stop_reason": stop_reason}],
                "usage": usage}

    def first_chunks(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish_reason: str | None = None, stop_reason: str | None = None) -> dict:
        return {**self._head(), "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason, "stop_reason": stop_reason}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(), "choices": [], "usage": usage}


class ChatFormat(CompletionFormat):
    """Bodies and chunks of /v1/chat/completions."""

    def full(self, text: str, finish_reason: str, stop_reason: str | None, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason, "stop_reason": stop_reason}],
                "usage": usage}

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def first_chunks(self) -> list[dict]:
        # OpenAI and vLLM open a chat stream with the role, before any content.
        return [{**self._head(), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]}]

    def chunk(self, text: str, finish_reason: str | None = None, stop_reason: str | None = None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        return {**self._head(), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason, "stop_reason": stop_reason}]}


class GenerationFailed(Exception):
    def __init__(self, failed: Failed):
        super().__init__(failed.reason.value)
        self.failed = failed


def failure_error(failed: Failed) -> ApiError:
    """The HTTP error of a request the engine failed."""
    detail = f": {failed.detail}" if failed.detail else ""
    if failed.reason is FailReason.QUEUE_FULL:
        retry = failed.retry_after_s if failed.retry_after_s is not None else 1.0
        return ApiError(429, f"the server is at capacity, retry later{detail}", type="rate_limit_error",
                        code=failed.reason.value, headers={"Retry-After": str(max(0, math.ceil(retry)))})
    return ApiError(FAIL_STATUS.get(failed.reason, 500), f"the request failed ({failed.reason.value}){detail}",
                    type="server_error", code=failed.reason.value)


class Generation:
    """One request on the engine: its outputs turned into text deltas, cut at stop strings, with
    its token counts and the metrics recorded once it ends."""

    def __init__(self, fe: FrontEnd, request_id: str, parsed: ParsedRequest):
        self.fe = fe
        self.request_id = request_id
        self.parsed = parsed
        self.detok = IncrementalDetokenizer(fe.tokenizer, parsed.prompt_ids)
        self.stops = StopStrings(parsed.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.ended = False  # the engine has nothing more to do for it (Done/Failed seen, or finish called)
        self.outputs = aiter(fe.engine.submit(GenerateRequest(request_id, parsed.prompt_ids, parsed.max_tokens,
                                                              parsed.sampling, parsed.ignore_eos)))
        self.admitted = False
        self.owes_done = False  # finish() was called: the engine still owes the Done
        self._fetch: asyncio.Future | None = None  # the engine's next output, being awaited
        self._lookahead = None  # an output fetched early, not yet handled

    @property
    def usage(self) -> dict:
        n = len(self.parsed.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}

    async def _next(self, timeout_s: float):
        """The engine's next output, END when its stream ended, TIMEOUT after `timeout_s`."""
        if self._lookahead is not None:
            out, self._lookahead = self._lookahead, None
            return out
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(anext(self.outputs, END))
        done, _ = await asyncio.wait({self._fetch}, timeout=timeout_s)
        fetch, self._fetch = self._fetch, None
        if not done:
            fetch.cancel()
            return TIMEOUT
        return fetch.result()

    async def _ready(self):
        """The engine's next output if it is already there (else None, and the fetch goes on)."""
        if self._lookahead is None:
            self._fetch = asyncio.ensure_future(anext(self.outputs, END))
            await asyncio.sleep(0)  # one turn of the loop: enough when the output is queued
            if self._fetch.done():
                self._lookahead, self._fetch = self._fetch.result(), None
        return self._lookahead

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas, one per engine output ("" when nothing is safe to send yet). Raises
        `GenerationFailed`; sets `finish_reason` with the last delta."""
        while True:
            out = await self._next(self.fe.output_timeout_s)
            if out is TIMEOUT:
                # The engine's own stage deadlines should have failed the request long before.
                self.fe.engine.cancel(self.request_id)
                self._ended(FailReason.DEADLINE.value)
                raise GenerationFailed(Failed(FailReason.DEADLINE, "no output from the engine for "
                                              f"{self.fe.output_timeout_s:g} s"))
            if out is END:
                # The stream ended without a Done or Failed: a broken contract, not the client's fault.
                self._ended("engine_closed")
                raise GenerationFailed(Failed(FailReason.WORKER_DIED, "the engine ended the request without a result"))
            if not self.admitted and not (isinstance(out, Failed) and out.reason is FailReason.QUEUE_FULL):
                self.admitted = True
                self.fe.metrics.prompt_tokens.inc(len(self.parsed.prompt_ids))
            if isinstance(out, Failed):
                self._ended(out.reason.value)
                raise GenerationFailed(out)
            if isinstance(out, Done):
                yield self._done(out)
                return
            self.completion_tokens += 1
            self.fe.metrics.generation_tokens.inc()
            text = self.stops.feed(self.detok.add(out.token))
            if self.stops.matched is not None:
                self._stopped()
                yield text
                return
            # vLLM sends the finish reason with the last text, not in a chunk of its own (a load
            # generator would count that chunk as one more inter-token gap): the engine queues
            # Done right behind the last token, so it is usually there already.
            if isinstance(await self._ready(), Done):
                self._lookahead, done = None, self._lookahead
                text += self._done(done)
            yield text
            if self.finish_reason is not None:
                return

    def _done(self, done: Done) -> str:
        """The engine finished the request: the text still held back, and the finish reason."""
        self._ended(done.reason.value)
        self._record_times(done)
        text = self.stops.feed(self.detok.flush())
        if self.stops.matched is not None:  # the held-back text completed a stop string
            self.stop_reason = self.stops.matched
            self.finish_reason = "stop"
        else:
            text += self.stops.flush()
            self.finish_reason = "length" if done.reason is FinishReason.LENGTH else "stop"
        return text

    def _stopped(self) -> None:
        """A stop string ended the text: the engine frees the request's slot."""
        self.fe.engine.finish(self.request_id)
        self.owes_done = True
        self._ended(FinishReason.STOP.value)
        self.finish_reason = "stop"
        self.stop_reason = self.stops.matched

    def _ended(self, outcome: str) -> None:
        if not self.ended:
            self.ended = True
            self.fe.metrics.requests.labels(outcome=outcome).inc()

    def _record_times(self, done: Done) -> None:
        m, times = self.fe.metrics, done.times
        if times.token_times:
            m.ttft.observe(ttft(times))
        if (t := tpot(times)) is not None:
            m.tpot.observe(t)
        m.e2e.observe(e2e_latency(times))

    async def drain(self) -> None:
        """After a stop string: wait (bounded) for the engine's Done, for its timings."""
        deadline = time.monotonic() + DRAIN_AFTER_STOP_S
        while (out := await self._next(max(0.0, deadline - time.monotonic()))) not in (END, TIMEOUT):
            if isinstance(out, Done):
                self._record_times(out)
                return
            if isinstance(out, Failed):
                return
        if out is TIMEOUT:
            log.warning("request %s: no Done from the engine %.0f s after finish()", self.request_id,
                        DRAIN_AFTER_STOP_S)

    def close(self) -> None:
        """The handler is leaving: if the engine still works on the request, its client is gone."""
        if self._fetch is not None:
            self._fetch.cancel()
        if not self.ended:
            self.fe.engine.cancel(self.request_id)
            self._ended(FailReason.DISCONNECTED.value)


async def _generate(request: web.Request, fe: FrontEnd, parsed: ParsedRequest,
                    fmt: CompletionFormat) -> web.StreamResponse:
    if fe.draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        gen = Generation(fe, fmt.id, parsed)
    except WaferError as e:
        # The engine refuses at submit what can never run. This module's own checks catch the bad
        # requests first, so a refusal here is the engine not running, unless its rules differ.
        if fe.engine.state().ready:
            raise ApiError(400, str(e)) from None
        raise ApiError(503, f"the engine is not accepting requests: {e}", type="server_error",
                       code="not_ready") from None
    fe.in_flight += 1
    fe.idle.clear()
    try:
        deltas = gen.deltas()
        try:
            first = await anext(deltas)
        except GenerationFailed as e:
            raise failure_error(e.failed) from None
        if parsed.stream:
            resp = await _stream(request, gen, fmt, first, deltas)
        else:
            texts = [first]
            try:
                async for text in deltas:
                    texts.append(text)
            except GenerationFailed as e:
                raise failure_error(e.failed) from None
            resp = web.json_response(fmt.full("".join(texts), gen.finish_reason, gen.stop_reason, gen.usage))
            await resp.prepare(request)
            await resp.write_eof()
        if gen.owes_done:
            await gen.drain()
        return resp
    except ConnectionResetError:
        # The client went away mid-write; `close` below cancels the request on the engine.
        return web.Response(status=499)
    finally:
        # Also reached when aiohttp cancels this handler because its client disconnected
        # (the server runs with handler_cancellation=True).
        gen.close()
        fe.in_flight -= 1
        if fe.in_flight == 0:
            fe.idle.set()


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _stream(request: web.Request, gen: Generation, fmt: CompletionFormat, first: str,
                  deltas: AsyncIterator[str]) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    usage_field = {"usage": None} if gen.parsed.include_usage else {}  # OpenAI: null on every chunk but the last
    for chunk in fmt.first_chunks():
        await resp.write(_sse({**chunk, **usage_field}))

    async def send(text: str) -> bool:
        """Write one token's delta; True once it was the last (its chunk carries the finish reason).
        A token whose text is held back (half a UTF-8 character, or perhaps the start of a stop
        string) still gets its chunk, with empty text, as vLLM streams it: a client timing tokens
        by chunks (TTFT, ITL) then sees each token when it was made, not when its text completed."""
        if gen.finish_reason is not None:
            await resp.write(_sse({**fmt.chunk(text, gen.finish_reason, gen.stop_reason), **usage_field}))
            return True
        await resp.write(_sse({**fmt.chunk(text), **usage_field}))
        return False

    try:
        if not await send(first):
            async for text in deltas:
                if await send(text):
                    break
        if gen.parsed.include_usage:
            await resp.write(_sse(fmt.usage_chunk(gen.usage)))
    except GenerationFailed as e:
        # Headers are sent, so the status cannot change. Like vLLM, send the error as one more
        # event (`data: {"error": {...}}`, which the openai client raises as an APIError), then
        # [DONE], then close.
        await resp.write(_sse(failure_error(e.failed).body()))
    await resp.write(_sse("[DONE]"))
    await resp.write_eof()
    return resp
