"""`wafer serve` end to end: the real command in a subprocess (real worker processes, real HTTP on
a free 127.0.0.1 port), checked against `wafer generate` on the same tiny checkpoint.

- Greedy text through the server (completions from token ids, chat from messages; streamed and
  not) equals `wafer generate`'s, in both modes; 8 concurrent streams each equal their solo text.
- The openai client: models list, streamed and non-streamed chat and completions, usage last.
- Faults: the decode worker SIGKILLed while a request streams; a client that disconnects frees
  the only slot.
- Every server stops on SIGTERM with exit code 0 and leaves no process behind.

The checkpoint is a tiny Llama with std-0.2 weights (greedy tokens well separated, as in
tests/test_serve_engine.py) and a word-level tokenizer whose tokens are fixed-width words joined
without separators ("t217t415..."), so a text equals another exactly when their tokens do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.workers import REPO, worker_env

START_S = 240.0  # the server imports JAX, then its workers load and compile (typically 20 s)
WAIT_S = 60.0  # any one HTTP call, a restart, a shutdown
MAX_LEN = 256
NEW_TOKENS = 12
COMPLETION_PROMPT = [10, 200, 300, 7, 8, 9, 400]
CHAT_TEXT = "t010 t200 t300 t042"
# Eight prompts of different lengths and limits, so requests join and leave the batch at
# different steps, and with 4 slots half of them wait for a slot another request held.
CONCURRENT = [([11 + i, 250 - i, 400 + i, 7][: 1 + i % 4] + [100 + 9 * i] * (i % 3), 6 + 2 * i) for i in range(8)]
# A request still decoding when its worker is killed or its client leaves: it ignores EOS (greedy
# decoding of this prompt meets EOS at its 62nd token), so only the fault can end it early.
LONG_PROMPT = [5, 6, 7]
LONG = 200
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["[UNK]", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_word_tokenizer(folder: str, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json (ChatML template) for ids 0..vocab_size-1: the
    specials, a few words, then "t007".."t511", decoded by concatenation."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    vocab.update({f"t{i:03d}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny std-0.2 Llama (EOS id 2, <|im_end|>) with the word tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tiny-llama-served"))
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=MAX_LEN,
                         tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    write_word_tokenizer(folder, config.vocab_size)
    return folder


def wafer(*argv) -> list[str]:
    return [sys.executable, "-m", "cli.main", *argv]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """`wafer generate --json` (single device, greedy, stops at EOS as the server does) for the
    completion prompt's ids and for the chat text, run side by side."""
    runs = {
        "completion": wafer("generate", "--checkpoint", checkpoint, "--prompt-ids",
                            ",".join(map(str, COMPLETION_PROMPT)), "--max-new-tokens", str(NEW_TOKENS), "--json"),
        "chat": wafer("generate", "--checkpoint", checkpoint, "--prompt", CHAT_TEXT, "--chat",
                      "--max-new-tokens", str(NEW_TOKENS), "--json"),
    }
    procs = {k: subprocess.Popen(argv, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, argv in runs.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=START_S)
        assert p.returncode == 0, stderr
        out[k] = json.loads(stdout)
    assert out["completion"]["prompt_ids"] == COMPLETION_PROMPT
    return out


# ------------------------------------------------------------------------------- the server process


def children(pid: int) -> set[int]:
    """Every descendant of `pid` alive now (from /proc/PID/task/*/children)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = {int(c) for c in f.read().split()}
            except FileNotFoundError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], fields[19]


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def wait_for(condition, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)
    return value


class Server:
    """`wafer serve` in a subprocess on a free port: its URL once /health answers 200, its worker
    pids by role (the workers name themselves wafer-prefill, wafer-decode, wafer-integrated), and
    `stop()`, which SIGTERMs it and checks the exit code and that no process it started is left."""

    def __init__(self, checkpoint: str, *flags: str):
        self.flags = ["--checkpoint", checkpoint, "--max-len", str(MAX_LEN), "--served-model-name", "ckpt", *flags]
        self.proc = subprocess.Popen(wafer("serve", "--port", "0", *self.flags),
                                     cwd=REPO, env=worker_env(), stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        # Read stderr in a thread: the pipe never fills, and the wait below has a deadline.
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        self.seen: dict[int, tuple[str, str] | None] = {}  # every descendant ever seen, with its start
        try:
            m = wait_for(lambda: self._exited() or re.search(r"listening on (http://\S+)", "".join(self.log)),
                         "the server to listen", START_S)
            self.url = m.group(1)
            wait_for(self.healthy, "/health 200")
            self.workers()
        except BaseException:
            self.kill()
            raise

    def _exited(self):
        if self.proc.poll() is not None:
            pytest.fail(f"wafer serve exited with {self.proc.returncode}:\n{''.join(self.log)}")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=WAIT_S).status_code == 200
        except requests.ConnectionError:
            return False

    def workers(self) -> dict[str, int]:
        """Worker pids by role ("prefill", "decode", "integrated"), as the workers named themselves."""
        out = {}
        for pid in children(self.proc.pid):
            self.seen.setdefault(pid, proc_stat(pid))
            name = comm(pid) or ""
            if name.startswith("wafer-"):
                role = name.removeprefix("wafer-")
                out["integrated" if role == "integrate" else role] = pid  # comm keeps 15 characters
        return out

    def metric(self, name: str, labels: dict | None = None) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=WAIT_S).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                    return s.value
        return 0.0

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)

    def gone(self, pid: int) -> bool:
        """The process is dead: no /proc entry, a zombie (reparented, not reaped yet), or a new one."""
        now = proc_stat(pid)
        return now is None or now[0] == "Z" or now[1] != self.seen[pid][1]

    def stop(self) -> None:
        self.workers()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(WAIT_S)
        finally:
            self.kill()
        self.reader.join(WAIT_S)
        log = "".join(self.log)
        assert rc == 0, log
        assert "wafer serve: stopped" in log and "Traceback" not in log, log
        left = {pid for pid, stat in self.seen.items() if stat is not None}
        # multiprocessing's resource tracker exits once it reads the server's end of its pipe close.
        wait_for(lambda: all(self.gone(pid) for pid in left), f"the server's processes {sorted(left)} to end")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT_S)


@pytest.fixture(scope="module", params=["disaggregated", "integrated"])
def server(request, checkpoint):
    """A 4-slot server in each mode, a 1x2 decode mesh (and a 1x1 prefill mesh)."""
    s = Server(checkpoint, "--mode", request.param, "--prefill-mesh", "1x1", "--decode-mesh", "1x2",
               "--slots", "4")
    assert set(s.workers()) == ({"prefill", "decode"} if request.param == "disaggregated" else {"integrated"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_slot(checkpoint):
    """A disaggregated server with a single decode slot: a second request waits for the first."""
    s = Server(checkpoint, "--decode-mesh", "1x2", "--slots", "1")
    yield s
    s.stop()


# ------------------------------------------------------------------------------------ requests


def completion(client: openai.OpenAI, stream: bool, prompt, max_tokens: int = NEW_TOKENS, chat: bool = False,
               ignore_eos: bool = False):
    """(text, finish_reason, usage) of a greedy request, streamed (usage from the last chunk) or not."""
    kw = dict(model="ckpt", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": ignore_eos})
    if chat:
        call, kw["messages"] = client.chat.completions.create, [{"role": "user", "content": prompt}]
    else:
        call, kw["prompt"] = client.completions.create, prompt
    if not stream:
        r = call(**kw)
        c = r.choices[0]
        return (c.message.content if chat else c.text), c.finish_reason, r.usage
    chunks = list(call(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # usage in the last chunk only
    assert all(c.usage is None for c in chunks[:-1])
    texts = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks[:-1]]
    return "".join(texts), chunks[-2].choices[0].finish_reason, chunks[-1].usage


def finish_reason_of(tokens: list[int], max_tokens: int) -> str:
    return "length" if len(tokens) == max_tokens and tokens[-1] != 2 else "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_from_token_ids_equals_generate(server, reference, stream):
    ref = reference["completion"]
    text, finish, usage = completion(server.client(), stream, COMPLETION_PROMPT)
    assert text == ref["text"]  # identical tokens (the tokenizer is one fixed-width word per id)
    assert finish == finish_reason_of(ref["tokens"], NEW_TOKENS)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(COMPLETION_PROMPT), len(ref["tokens"]))
    # The server's default --schedule auto measured the schedules on the decode mesh before serving.
    assert re.search(r"decode mesh 1x2: all-reduce schedule (psum|ring|ktree), measured \(psum [\d.]+ ms, ring",
                     "".join(server.log))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_generate(server, reference, stream):
    ref = reference["chat"]
    text, finish, usage = completion(server.client(), stream, CHAT_TEXT, chat=True)
    assert text == ref["text"]
    assert finish == finish_reason_of(ref["tokens"], NEW_TOKENS)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref["prompt_ids"]), len(ref["tokens"]))


def test_eight_concurrent_streams_each_equal_their_solo_text(server):
    async def one(client, prompt, n):
        chunks = [c async for c in await client.completions.create(model="ckpt", prompt=prompt, max_tokens=n,
                                                                     temperature=0, stream=True)]
        return "".join(c.choices[0].text for c in chunks)

    async def run():
        async with server.async_client() as client:
            solo = [await one(client, p, n) for p, n in CONCURRENT]
            together = await asyncio.gather(*(one(client, p, n) for p, n in CONCURRENT))
        return solo, together
    solo, together = asyncio.run(asyncio.wait_for(run(), 2 * WAIT_S))
    assert together == solo
    assert len(set(solo)) == len(solo)  # different prompts: a mix-up between streams would show


def test_the_openai_client_lists_the_model(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["ckpt"] and models[0].model_extra["max_model_len"] == MAX_LEN


# ------------------------------------------------------------------------------------- faults


async def sse(resp: aiohttp.ClientResponse):
    """The decoded `data:` payloads of a streamed response ([DONE] as the string)."""
    async for line in resp.content:
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].decode().strip()
            yield payload if payload == "[DONE]" else json.loads(payload)


async def open_stream(session: aiohttp.ClientSession, url: str, prompt, max_tokens: int, ignore_eos: bool = False):
    """A streamed greedy completion, its response and its events (after the first one, returned)."""
    resp = await session.post(f"{url}/v1/completions", json=dict(model="ckpt", prompt=prompt, max_tokens=max_tokens,
                                                                  temperature=0, stream=True, ignore_eos=ignore_eos))
    assert resp.status == 200, await resp.text()
    events = sse(resp)
    return resp, events, await anext(events)


async def rest(events) -> list:
    return [e async for e in events]


def test_a_killed_decode_worker_fails_its_stream_and_the_server_recovers(one_slot, reference):
    s = one_slot
    before = s.workers()
    restarts = s.metric("wafer_worker_restarts_total", {"worker": "decode"})

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2 * WAIT_S)) as session:
            a, a_events, a_first = await open_stream(session, s.url, LONG_PROMPT, LONG, ignore_eos=True)
            a_second = await anext(a_events)  # a token of a decode step: its cache landed, it decodes
            # Stopped (not yet killed) while the second request is prefilled: the first cannot run
            # to its limit meanwhile (a delayed prefill once let it finish all LONG tokens before
            # the kill). The stop is far shorter than the server's 30 s step deadline.
            os.kill(before["decode"], signal.SIGSTOP)
            # The second request's first token comes from the prefill worker: once it is here, the
            # request waits for the only slot, which the first one holds.
            b, b_events, b_first = await open_stream(session, s.url, COMPLETION_PROMPT, NEW_TOKENS)
            os.kill(before["decode"], signal.SIGKILL)
            a_rest, b_rest = await asyncio.gather(rest(a_events), rest(b_events))
            a.release()
            b.release()
            return [a_first, a_second, *a_rest], [b_first, *b_rest]
    a_events, b_events = asyncio.run(scenario())

    # The decoding request: its tokens so far, then an error event (headers were sent: no status to
    # change), then [DONE]; it never reached its limit.
    assert a_events[-1] == "[DONE]" and "error" in a_events[-2], a_events[-3:]
    assert a_events[-2]["error"]["code"] == "worker_died" and a_events[-2]["error"]["type"] == "server_error"
    assert 2 <= len(a_events[:-2]) < LONG
    assert a_events[-2]["error"]["message"].endswith("while decoding")
    # The waiting request completes on the restarted worker, or fails visibly: never silence.
    assert b_events[-1] == "[DONE]"
    if "error" in b_events[-2]:
        assert b_events[-2]["error"]["type"] == "server_error"
    else:
        assert "".join(e["choices"][0]["text"] for e in b_events[:-1]) == reference["completion"]["text"]

    wait_for(s.healthy, "/health 200 after the restart")
    after = s.workers()
    assert after["prefill"] == before["prefill"] and after["decode"] != before["decode"]
    assert s.gone(before["decode"])
    assert s.metric("wafer_worker_restarts_total", {"worker": "decode"}) == restarts + 1
    text, _, _ = completion(s.client(), True, COMPLETION_PROMPT)
    assert text == reference["completion"]["text"]
    # What the killed request got before the kill was right: a prefix of its text run again.
    whole, _, _ = completion(s.client(), False, LONG_PROMPT, LONG, ignore_eos=True)
    assert whole.startswith("".join(e["choices"][0]["text"] for e in a_events[:-2]))


def test_a_client_that_disconnects_frees_the_only_slot(one_slot, reference):
    s = one_slot
    steps = s.metric("wafer_decode_step_seconds_count")
    gone = s.metric("wafer_requests_total", {"outcome": "disconnected"})

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
            resp, events, _ = await open_stream(session, s.url, LONG_PROMPT, LONG, ignore_eos=True)
            await anext(events)  # a token from a decode step: the request holds the slot
            resp.close()  # drops the connection, mid-stream
        # The next request would wait for LONG tokens if the slot were not freed.
        async with s.async_client() as client:
            r = await client.completions.create(model="ckpt", prompt=COMPLETION_PROMPT, max_tokens=NEW_TOKENS,
                                                temperature=0)
        return r.choices[0].text
    assert asyncio.run(scenario()) == reference["completion"]["text"]
    assert s.metric("wafer_requests_total", {"outcome": "disconnected"}) == gone + 1
    # The abandoned request stopped within a few steps of its client leaving, far from its limit.
    assert s.metric("wafer_decode_step_seconds_count") - steps < LONG // 2
    wait_for(lambda: s.metric("wafer_slots_in_use") == 0, "the slot to be free")


@pytest.mark.slow
def test_the_overhead_bench_measures_a_running_server(server):
    """`wafer bench serve-overhead` with the server's own flags: figures for both sides (no target
    is asserted: a benchmark is a command, and these are wall-clock times on shared CPUs)."""
    out = subprocess.run(wafer("bench", "serve-overhead", "--url", server.url, *server.flags, "--input-len", "8",
                               "--output-len", "6", "--repeats", "2", "--json"),
                         cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=START_S)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["served_model"] == "ckpt" and (r["input_len"], r["output_len"]) == (8, 6)
    assert all(r[k] > 0 for k in ("ttft_ms", "tpot_ms", "prefill_ms", "step_ms", "ttft_ratio", "tpot_ratio"))
    assert (r["handoff_ms"] > 0) == (r["mode"] == "disaggregated")
