"""The OpenAI front end over a scripted engine: the real aiohttp server on a free 127.0.0.1 port,
driven by the `openai` client and by raw HTTP, with SmolLM2's real tokenizer.

The server runs its own event loop in a thread; tests talk to it with blocking clients, each with
a timeout, and poll for the engine's side of things with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from model.config import SMOLLM2_135M
from serve.detokenize import IncrementalDetokenizer, StopStrings
from serve.events import FailReason
from serve.http import make_app
from serve.metrics import ServeMetrics
from serve.server import shutdown, start_site
from tests.helpers.fake_engine import FakeEngine, Script

MODEL = "smollm2-135m"
CAPACITY = 256
TIMEOUT_S = 10.0  # every HTTP call and every wait in this file
# A text whose byte-level BPE tokens end mid-character (checked by test_the_utf8_text_splits_characters).
UTF8_TEXT = "héllo 東京 🙂👍🏽 café"


@pytest.fixture(scope="session")
def tokenizer():
    from model.load import load_tokenizer
    return load_tokenizer(MODEL)


class ServerThread:
    """The app on its own event loop in a daemon thread, listening on a free port."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, port = self.call(start_site(app, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT_S)

    def close(self):
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)


@pytest.fixture(scope="module")
def served(tokenizer):
    engine = FakeEngine(SMOLLM2_135M, capacity=CAPACITY)
    metrics = ServeMetrics()
    server = ServerThread(make_app(engine, tokenizer, MODEL, metrics))
    yield server, engine, metrics
    server.close()


@pytest.fixture
def engine(served):
    _, engine, _ = served
    engine.reset()
    engine.ready = True
    engine.waiting = 0
    return engine


@pytest.fixture
def url(served, engine):
    return served[0].url


@pytest.fixture(scope="module")
def openai_client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture
def client(openai_client, engine):
    return openai_client


def wait_for(condition, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def post(url, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=TIMEOUT_S, **kw)


def sse_events(resp) -> list:
    """The `data:` payloads of a streamed response, JSON-decoded ([DONE] kept as a string)."""
    events = []
    for line in resp.iter_lines(decode_unicode=False):
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].decode("utf-8")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def script_text(engine, tokenizer, text, **kw) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    engine.script = Script(tokens=tuple(ids), **kw)
    return ids


# ----------------------------------------------------------------------------- the openai client


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_not_streamed(client, engine, tokenizer):
    script_text(engine, tokenizer, "Paris is the capital.")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                       max_tokens=50, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Paris is the capital."
    assert r.choices[0].finish_reason == "stop"  # the script ran out: EOS
    sent = engine.submitted[0]
    expected_prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Capital of France?"}]),
                                       add_special_tokens=False)
    assert list(sent.prompt_ids) == expected_prompt
    assert sent.max_new_tokens == 50 and sent.sampling.greedy
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == len(engine.script.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_with_usage_last(client, engine, tokenizer):
    ids = script_text(engine, tokenizer, "One two three four five six")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(ids[:4])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_content_parts_and_system_role(client, engine, tokenizer):
    script_text(engine, tokenizer, "ok")
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    rendered = tokenizer.render_chat([{"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": "Hi\nthere"}])
    assert list(engine.submitted[0].prompt_ids) == tokenizer.encode(rendered, add_special_tokens=False)
    assert engine.submitted[0].max_new_tokens == 3


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, engine, tokenizer):
    script_text(engine, tokenizer, "ok")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    sent = engine.submitted[0]
    assert sent.max_new_tokens == CAPACITY - len(sent.prompt_ids)


def test_completion_not_streamed_with_token_ids(client, engine, tokenizer):
    script_text(engine, tokenizer, " a fine day")
    r = client.completions.create(model=MODEL, prompt=[1, 9690, 198], max_tokens=10, temperature=0.7, top_p=0.9,
                                  seed=1234, extra_body={"top_k": 40, "ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == " a fine day"
    sent = engine.submitted[0]
    assert sent.prompt_ids == (1, 9690, 198)
    assert sent.ignore_eos
    assert (sent.sampling.temperature, sent.sampling.top_p, sent.sampling.top_k, sent.sampling.seed) == \
        (0.7, 0.9, 40, 1234)


def test_completion_defaults_follow_vllm(client, engine, tokenizer):
    script_text(engine, tokenizer, "x")
    client.completions.create(model=MODEL, prompt="Once upon a time")
    sent = engine.submitted[0]
    assert sent.max_new_tokens == 16  # vLLM's completion default
    assert sent.sampling.temperature == 1.0  # OpenAI's default: sampled
    assert list(sent.prompt_ids) == tokenizer.encode("Once upon a time")


def test_completion_streamed_with_usage_last(client, engine, tokenizer):
    ids = script_text(engine, tokenizer, "The quick brown fox")
    stream = client.completions.create(model=MODEL, prompt=["The"], max_tokens=100, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The quick brown fox"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == len(tokenizer.encode("The"))


def test_a_load_generator_payload_is_accepted(url, engine, tokenizer):
    """What `vllm bench serve` sends: explicit nulls and defaults for what it does not use, extra fields."""
    script_text(engine, tokenizer, "x y z")
    body = {"model": MODEL, "prompt": [11, 12, 13], "temperature": 0.0, "max_tokens": 3, "logprobs": None,
            "best_of": 1, "presence_penalty": 0.0, "n": 1, "stream": True, "ignore_eos": True, "user": "bench",
            "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    with post(url, "/v1/completions", body, stream=True) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-2]["usage"]["completion_tokens"] == 3
    assert engine.submitted[0].ignore_eos and engine.submitted[0].sampling.greedy


def test_stream_ends_with_done(url, engine, tokenizer):
    script_text(engine, tokenizer, "Hi there")
    with post(url, "/v1/completions", {"prompt": "x", "stream": True}, stream=True) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "usage" not in events[-2]  # no include_usage: no usage anywhere
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
])
def test_the_finish_reason_comes_with_the_last_text(url, engine, tokenizer, path, body):
    """As vLLM streams it: no chunk without text but the chat's opening role chunk, so a load
    generator counts one inter-token gap per token."""
    ids = script_text(engine, tokenizer, "alpha beta gamma delta", token_delay_s=0.01)
    with post(url, path, {**body, "stream": True, "max_tokens": len(ids)}, stream=True) as resp:
        choices = [e["choices"][0] for e in sse_events(resp)[:-1]]
    if path == "/v1/chat/completions":
        assert choices.pop(0)["delta"] == {"role": "assistant", "content": ""}
    texts = [c["text"] if "text" in c else c["delta"]["content"] for c in choices]
    assert "".join(texts) == "alpha beta gamma delta" and all(texts)
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]


def test_eos_is_stop_and_counted(client, engine, tokenizer):
    eos = SMOLLM2_135M.eos_token_ids[0]
    engine.script = Script(tokens=(*tokenizer.encode("Done", add_special_tokens=False), eos, 42, 43))
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10)
    assert r.choices[0].text == "Done"  # EOS is a special token: not in the text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 2


# -------------------------------------------------------------------------- detokenizing and stops


def test_the_utf8_text_splits_characters(tokenizer):
    """The texts below are a real test only if some token decodes to half a character."""
    ids = tokenizer.encode(UTF8_TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_detokenizer_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(UTF8_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:", add_special_tokens=False))
    deltas = [detok.add(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.flush() == UTF8_TEXT
    assert "" in deltas  # something was held back


@pytest.mark.parametrize("text", [
    UTF8_TEXT, "def f(x):\n    return x * 2\n", "unicode: Ελληνικά русский 日本語 한국어 🇫🇷 zero\u200bwidth\r\n",
    "   leading and trailing   ", "<|im_end|> specials are skipped", "",
])
def test_detokenizer_deltas_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi.", add_special_tokens=False))
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_hand_split_character(tokenizer):
    """東 is E6 9D B1 in UTF-8, and SmolLM2's tokens for 東京 are E6 9D | B1 | E4 BA | AC."""
    ids = tokenizer.encode("東京", add_special_tokens=False)
    assert [tokenizer.backend.id_to_token(i) for i in ids] == ["æĿ", "±", "äº", "¬"]  # GPT-2 byte letters
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["", "東", "", "京"]


def test_detokenizer_flush_drops_half_a_character(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    assert len(ids) >= 2
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add(i) for i in ids[:-1])
    assert text + detok.flush() == "a"  # the emoji never completed


def test_detokenizer_prompt_ending_mid_character(tokenizer):
    """A prompt of raw ids may end mid-character; its bytes must not leak into the output."""
    partial = tokenizer.encode("東", add_special_tokens=False)[:-1] or [0]
    detok = IncrementalDetokenizer(tokenizer, [*tokenizer.encode("ab", add_special_tokens=False), *partial])
    out = "".join(detok.add(i) for i in tokenizer.encode(" ok", add_special_tokens=False))
    assert out == " ok"


@pytest.mark.parametrize("pieces, stops, released, matched", [
    (["Hel", "lo wor", "ld"], ["lo w"], "Hel", "lo w"),  # spans two pieces
    (["abc", "def"], ["xyz"], "abcdef", None),
    (["ab", "c"], ["bd", "c"], "ab", "c"),  # "b" held for "bd", released when "c" arrives; "c" stops
    (["a<", "|e", "nd|>tail"], ["<|end|>"], "a", "<|end|>"),
    (["no stops"], [], "no stops", None),
])
def test_stop_strings(pieces, stops, released, matched):
    s = StopStrings(stops)
    out = "".join(s.feed(p) for p in pieces) + s.flush()
    assert (out, s.matched) == (released, matched)


def test_stop_strings_hold_back_only_a_possible_start():
    s = StopStrings(["STOP"])
    assert s.feed("abcST") == "abc"
    assert s.feed("x") == "STx"
    assert s.feed("S") == ""
    assert s.flush() == "S"


def test_streamed_utf8_has_no_replacement_character(url, engine, tokenizer):
    script_text(engine, tokenizer, UTF8_TEXT)
    with post(url, "/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 100}, stream=True) as resp:
        events = sse_events(resp)
    texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"]]
    assert not any("\ufffd" in t for t in texts)
    assert "".join(texts) == UTF8_TEXT
    # One chunk per token, as vLLM streams: the tokens that end mid-character get theirs with
    # empty text, so a client timing tokens by chunks sees every token when it is made.
    # (The finish reason may come in a chunk of its own, with empty text, if the engine's Done
    # was not queued yet when the last token's chunk went out: that chunk is not a token's.)
    ids = tokenizer.encode(UTF8_TEXT, add_special_tokens=False)
    assert len(texts) - (texts[-1] == "") == len(ids) and "" in texts


def test_stop_string_spanning_two_tokens(client, engine, tokenizer):
    ids = script_text(engine, tokenizer, "The answer is forty two, and then more text follows here")
    pieces = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(2, len(ids)) if len(pieces[k]) - len(pieces[k - 1]) >= 3)
    stop = pieces[k - 1][-2:] + pieces[k][len(pieces[k - 1]):][:2]  # two chars each side of a token boundary
    expected = pieces[k - 1][:-2]
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=50, stop=[stop, "zzz"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert engine.finished == [engine.submitted[0].request_id]

    engine.reset(engine.script)
    stream = client.completions.create(model=MODEL, prompt="x", max_tokens=50, stop=stop, stream=True)
    texts = [c.choices[0].text for c in stream]
    assert "".join(texts) == expected
    assert not any(stop[:2] in t for t in texts)
    assert engine.finished == [engine.submitted[0].request_id]


def test_stop_string_in_chat(client, engine, tokenizer):
    script_text(engine, tokenizer, "Paris. Then Rome.")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=".")
    assert r.choices[0].message.content == "Paris"
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"\xff\xfe", None),
    ("/v1/completions", [1, 2], None),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 49152]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": CAPACITY}, "max_tokens"),
    ("/v1/completions", {"prompt": list(range(CAPACITY))}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "no"}, "ignore_eos"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CAPACITY},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_requests_are_400_with_an_openai_error_body(url, engine, path, body, param):
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert "Traceback" not in r.text
    assert engine.submitted == []


def test_context_overflow_names_the_lengths(url, engine):
    r = post(url, "/v1/completions", {"prompt": [1] * 200, "max_tokens": 100})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "256" in err["message"] and "300" in err["message"]


def test_openai_client_raises_bad_request(client, engine):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", n=2)


def test_unknown_model_is_404(client, engine):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    assert engine.submitted == []


def test_absent_model_means_the_served_one(url, engine, tokenizer):
    script_text(engine, tokenizer, "x")
    assert post(url, "/v1/completions", {"prompt": "x"}).status_code == 200


def test_unknown_route_is_a_json_404(url):
    r = requests.get(f"{url}/v1/nothing", timeout=TIMEOUT_S)
    assert r.status_code == 404
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(url, engine, stream):
    engine.script = Script(fail=FailReason.QUEUE_FULL, retry_after_s=2.5)
    r = post(url, "/v1/completions", {"prompt": "x", "stream": stream})
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] == "queue_full"


def test_openai_client_sees_rate_limit(client, engine):
    engine.script = Script(fail=FailReason.QUEUE_FULL, retry_after_s=1.0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("reason, status", [
    (FailReason.WORKER_DIED, 503), (FailReason.DEADLINE, 504), (FailReason.HANDOFF_REFUSED, 500),
    (FailReason.PREFILL_FAILED, 500),
])
@pytest.mark.parametrize("tokens", [(), (100, 200)])
def test_engine_failure_is_5xx(url, engine, reason, status, tokens):
    engine.script = Script(tokens=tokens, fail=reason)
    r = post(url, "/v1/completions", {"prompt": "x"})
    assert r.status_code == status
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("server_error", reason.value)
    assert "Traceback" not in r.text


def test_failure_mid_stream_is_an_error_event(url, client, engine, tokenizer):
    script_text(engine, tokenizer, "Partial answer", fail=FailReason.WORKER_DIED)
    with post(url, "/v1/completions", {"prompt": "x", "stream": True}, stream=True) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "worker_died"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "Partial answer"

    with pytest.raises(openai.APIError):
        list(client.completions.create(model=MODEL, prompt="x", stream=True))


# ---------------------------------------------------------------------------------- disconnects


def test_disconnect_mid_stream_cancels(url, engine, tokenizer):
    script_text(engine, tokenizer, "Hello there", hang=True)
    with post(url, "/v1/completions", {"prompt": "x", "stream": True}, stream=True) as resp:
        first = next(resp.iter_lines())
        assert first.startswith(b"data: ")
    wait_for(lambda: engine.cancelled == [engine.submitted[0].request_id], "engine.cancel")
    assert engine.finished == []


def test_disconnect_before_the_first_token_cancels(url, engine):
    """Nothing is written to this client (its request waits), so only the closed socket tells."""
    engine.script = Script(hang=True)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: len(engine.submitted) == 1, "the request to reach the engine")
    wait_for(lambda: engine.cancelled == [engine.submitted[0].request_id], "engine.cancel")


def test_finished_requests_are_not_cancelled(client, engine, tokenizer):
    script_text(engine, tokenizer, "Short")
    client.completions.create(model=MODEL, prompt="x")
    list(client.completions.create(model=MODEL, prompt="x", stream=True))
    assert engine.cancelled == []


# ------------------------------------------------------------------------------- health, metrics


def test_health(url, engine):
    assert requests.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200
    engine.ready = False
    r = requests.get(f"{url}/health", timeout=TIMEOUT_S)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def metric_samples(url) -> dict:
    r = requests.get(f"{url}/metrics", timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_parse_and_count(url, client, engine, tokenizer):
    before = metric_samples(url)
    ids = script_text(engine, tokenizer, "one two three")
    client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=20)
    engine.script = Script(fail=FailReason.QUEUE_FULL)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt=[5, 6, 7])
    engine.waiting = 7
    after = metric_samples(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("wafer_requests_total", outcome="eos") == 1
    assert delta("wafer_requests_total", outcome="queue_full") == 1
    assert delta("wafer_prompt_tokens_total") == 3  # the refused request was never admitted
    assert delta("wafer_generation_tokens_total") == len(ids)
    assert delta("wafer_time_to_first_token_seconds_count") == 1
    assert delta("wafer_time_per_output_token_seconds_count") == 1
    assert delta("wafer_e2e_request_latency_seconds_count") == 1
    assert after[("wafer_queue_depth", ())] == 7


def test_metrics_count_disconnects(url, engine, tokenizer):
    before = metric_samples(url).get(("wafer_requests_total", (("outcome", "disconnected"),)), 0)
    script_text(engine, tokenizer, "Hello", hang=True)
    with post(url, "/v1/completions", {"prompt": "x", "stream": True}, stream=True) as resp:
        next(resp.iter_lines())
    wait_for(lambda: engine.cancelled, "engine.cancel")
    wait_for(lambda: metric_samples(url).get(("wafer_requests_total", (("outcome", "disconnected"),)), 0)
             == before + 1, "the disconnect to be counted")


# ---------------------------------------------------------------------------------- shutdown


def test_shutdown_fails_what_is_in_flight_and_refuses_new_work(tokenizer):
    engine = FakeEngine(SMOLLM2_135M, capacity=CAPACITY)
    server = ServerThread(make_app(engine, tokenizer, MODEL, ServeMetrics()))
    try:
        engine.script = Script(tokens=tuple(tokenizer.encode("Hi", add_special_tokens=False)), hang=True)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(server.url, "/v1/completions", {"prompt": "x"})))
        t.start()
        wait_for(lambda: len(engine.submitted) == 1, "the request in flight")
        server.call(shutdown(server.runner, engine, grace_s=0.2))
        server.runner = None
        t.join(TIMEOUT_S)
        assert engine.stopped
        assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "worker_died"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/health", timeout=TIMEOUT_S)
    finally:
        server.close()


def test_shutdown_lets_requests_in_flight_finish(tokenizer):
    engine = FakeEngine(SMOLLM2_135M, capacity=CAPACITY)
    server = ServerThread(make_app(engine, tokenizer, MODEL, ServeMetrics()))
    try:
        engine.script = Script(tokens=tuple(tokenizer.encode("slow but sure", add_special_tokens=False)),
                               token_delay_s=0.05)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(server.url, "/v1/completions", {"prompt": "x"})))
        t.start()
        wait_for(lambda: len(engine.submitted) == 1, "the request in flight")
        server.call(shutdown(server.runner, engine, grace_s=TIMEOUT_S / 2))
        server.runner = None
        t.join(TIMEOUT_S)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "slow but sure"
    finally:
        server.close()


def test_an_engine_that_goes_silent_is_cancelled_with_504(tokenizer):
    engine = FakeEngine(SMOLLM2_135M, capacity=CAPACITY)
    server = ServerThread(make_app(engine, tokenizer, MODEL, ServeMetrics(), output_timeout_s=0.2))
    try:
        engine.script = Script(hang=True)
        r = post(server.url, "/v1/completions", {"prompt": "x"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline"
        assert engine.cancelled == [engine.submitted[0].request_id]
    finally:
        server.close()


def test_concurrent_streams_each_get_their_whole_text(url, engine, tokenizer):
    script_text(engine, tokenizer, UTF8_TEXT, token_delay_s=0.005)
    results = [None] * 8

    def one(i):
        with post(url, "/v1/completions", {"prompt": [i + 1], "stream": True, "max_tokens": 100},
                  stream=True) as resp:
            results[i] = "".join(e["choices"][0]["text"] for e in sse_events(resp)[:-1] if e["choices"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert results == [UTF8_TEXT] * 8
    assert sorted(r.prompt_ids for r in engine.submitted) == [(i + 1,) for i in range(8)]


def test_a_stopped_engine_refusing_at_submit_is_503(tokenizer):
    engine = FakeEngine(SMOLLM2_135M, capacity=CAPACITY)
    server = ServerThread(make_app(engine, tokenizer, MODEL, ServeMetrics()))
    try:
        server.call(engine.stop())
        r = post(server.url, "/v1/completions", {"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "not running" in r.json()["error"]["message"]
    finally:
        server.close()
