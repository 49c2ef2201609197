"""OpenAI request bodies to what the engine runs: the prompt's token ids, the token limit, the
sampling knobs and the stop strings, with every refusal an `ApiError` (an OpenAI-style error body
and its HTTP status).

Defaults follow vLLM's OpenAI server: a completion's `max_tokens` defaults to 16 (OpenAI's legacy
default, kept by vLLM), a chat's to the rest of the context; `temperature` defaults to 1.0
(OpenAI's default: sampling, not greedy); `top_k` 0 or -1 means off.
"""

from __future__ import annotations

import dataclasses
import math
import random

from mesh.errors import WaferError
from model.sampling import Sampling
from model.tokenizer import TextTokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
CHAT_ROLES = ("system", "user", "assistant")
# Fields whose effect this server does not implement, with the value that means "off". A request
# asking for more is refused rather than answered as if it had not asked.
UNSUPPORTED_UNLESS = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "response_format": (None, {"type": "text"}),
}
SEED_MODULUS = 1 << 32  # the kernels take a uint32 seed; any integer seed is reduced to one


class ApiError(Exception):
    """A request the server refuses: its HTTP status and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """One completion or chat request, ready for the engine."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    ignore_eos: bool


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine can take: token ids below `vocab_size`, `capacity` positions in all."""

    vocab_size: int
    capacity: int


def parse_completion(body: object, tokenizer: TextTokenizer, model_name: str, limits: Limits) -> ParsedRequest:
    """A POST /v1/completions body."""
    body = _common_checks(body, model_name)
    if "prompt" not in body:
        raise bad_request("'prompt' is required", "prompt")
    prompt_ids = _prompt_ids(body["prompt"], tokenizer)
    max_tokens = _opt_int(body, "max_tokens", minimum=1, default=COMPLETION_DEFAULT_MAX_TOKENS)
    return _finish(body, prompt_ids, max_tokens, "max_tokens", limits)


def parse_chat(body: object, tokenizer: TextTokenizer, model_name: str, limits: Limits) -> ParsedRequest:
    """A POST /v1/chat/completions body."""
    body = _common_checks(body, model_name)
    messages = _messages(body.get("messages"))
    if not tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.render_chat(messages)
    except WaferError as e:
        raise bad_request(str(e), "messages") from None
    # The rendered template holds every special token already (as vLLM and HF tokenize it).
    prompt_ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    # vLLM: max_completion_tokens (the newer name) wins over max_tokens.
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _opt_int(body, param, minimum=1, default=None)
    return _finish(body, prompt_ids, max_tokens, param, limits)


def _common_checks(body: object, model_name: str) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request("only n=1 is supported", "n")
    for name, off in UNSUPPORTED_UNLESS.items():
        if name in body and body[name] not in off:
            raise bad_request(f"'{name}' is not supported by this server", name)
    return body


def _prompt_ids(prompt: object, tokenizer: TextTokenizer) -> tuple[int, ...]:
    """A string, a list of token ids, or a list holding exactly one of those."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise bad_request(f"batches of prompts are not supported (got {len(prompt)}); send one per request",
                              "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # As vLLM's completions: the tokenizer's own special tokens (BOS for Llama-3) are added.
        return tuple(tokenizer.encode(prompt))
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        return tuple(prompt)
    raise bad_request("'prompt' must be a string, a list of token ids, or a list holding one of those", "prompt")


def _messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", "messages")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content: object, i: int) -> str:
    """String content, or a list of text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content: only parts of type 'text' with a string 'text' "
                                  "are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _finish(body: dict, prompt_ids: tuple[int, ...], max_tokens: int | None, max_param: str,
            limits: Limits) -> ParsedRequest:
    if not prompt_ids:
        raise bad_request("the prompt is empty", "prompt")
    bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", "prompt")
    room = limits.capacity - len(prompt_ids)
    if max_tokens is None:  # vLLM: the rest of the context
        max_tokens = room
    if max_tokens > room or room < 1:
        raise bad_request(f"This model's maximum context length is {limits.capacity} tokens. However, you "
                          f"requested {len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the "
                          f"prompt, {max(max_tokens, 1)} in the completion). Please reduce the length of the "
                          "prompt or completion.", max_param, "context_length_exceeded")

    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:  # vLLM refuses these the same way
            raise bad_request("stream_options can only be set when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = _opt_bool(options, "include_usage", False)

    temperature = _opt_float(body, "temperature", DEFAULT_TEMPERATURE)
    top_p = _opt_float(body, "top_p", 1.0)
    top_k = _opt_int(body, "top_k", minimum=-1, default=0)
    seed = _opt_int(body, "seed", minimum=None, default=None)
    if temperature < 0:
        raise bad_request(f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if seed is None:  # an unseeded sampled request draws afresh each time, as OpenAI's do
        seed = random.randrange(SEED_MODULUS)
    sampling = Sampling(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed % SEED_MODULUS)
    return ParsedRequest(prompt_ids, max_tokens, sampling, _stop(body.get("stop")), stream, include_usage,
                         _opt_bool(body, "ignore_eos", False))


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    return tuple(stop)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_int(body: dict, name: str, minimum: int | None, default):
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if not _is_int(x):
        raise bad_request(f"'{name}' must be an integer, got {x!r}", name)
    if minimum is not None and x < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {x}", name)
    return x


def _opt_float(body: dict, name: str, default: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise bad_request(f"'{name}' must be a finite number, got {x!r}", name)
    return float(x)


def _opt_bool(body: dict, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise bad_request(f"'{name}' must be true or false, got {x!r}", name)
    return x
