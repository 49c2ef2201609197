"""Our tokenizer and chat template against HF transformers' tokenizer of the same GGUF file.

HF builds its tokenizer from the GGUF metadata with its own converter (`gguf_file=`), so the two
share only the file. The tokenizer under test is SmolLM2's as the loader hands it out (through
the weight cache's JSON), the one built fresh from the GGUF fields, and the one read back from
an HF `save_pretrained` folder.
"""

from __future__ import annotations

import json
import os

import pytest

from model.tokenizer import TextTokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_folder

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14, 1,000,000 or -0.5e-3; dated 2024-06-01 at 09:30",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None\n\n\n",
    "unicode: café naïve Ελληνικά русский 東京 日本語 한국어 🙂👍🏽 🇫🇷 zero\u200bwidth\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>and <file_sep>x<jupyter_code>y<empty_output><gh_stars>10",
    "not special: <|im_start |> <im_end> <|unknown|>",
    "   leading spaces",
    "trailing spaces   ",
    "\n\nnewlines first",
    "a , b . c 's don 't I'm WON'T",
    "https://example.com/path?q=1&r=2#frag",
    " ",
    "",
]
CORPUS_IDS = [f"{i}:{text[:16]!r}" for i, text in enumerate(CORPUS)]

SINGLE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are terse. Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? (東京?) 🙂"},
]
CONVERSATIONS = {"single_turn": SINGLE_TURN, "multi_turn_with_system": MULTI_TURN}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2.source), gguf_file=os.path.basename(smollm2.source))


@pytest.fixture(scope="module")
def ours(smollm2) -> TextTokenizer:
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def fresh_from_gguf(smollm2) -> TextTokenizer:
    """Built from the GGUF fields now, not read back from the weight cache."""
    import gguf

    reader = gguf.GGUFReader(smollm2.source)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf_fields(fields)


@pytest.fixture(scope="module")
def hf_folder(hf_tokenizer, tmp_path_factory) -> str:
    """HF's tokenizer written by `save_pretrained` (tokenizer.json, tokenizer_config.json, template)."""
    path = str(tmp_path_factory.mktemp("hf_tokenizer"))
    hf_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_encode_matches_hf(text, ours, hf_tokenizer):
    theirs = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == theirs
    # HF's default adds nothing either (the GGUF says add_bos_token false), so a user comparing
    # against plain `tokenizer.encode` sees the same ids.
    assert hf_tokenizer.encode(text) == theirs


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_decode_matches_hf_and_round_trips(text, ours, hf_tokenizer):
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        theirs = hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) == theirs, f"skip_special_tokens={skip}"
    # Byte-level BPE loses nothing: special tokens come back when they are not skipped.
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_tokens_match_hf(ours, hf_tokenizer):
    assert ours.backend.get_vocab_size() == len(hf_tokenizer)
    assert (ours.bos_token, ours.eos_token) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    theirs = {i: t.content for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special}
    assert {i: t.content for i, t in ours.backend.get_added_tokens_decoder().items() if t.special} == theirs
    # Display decoding drops every special token, HF's list of them included.
    assert ours.decode(sorted(theirs)) == ""


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_hf(name, generation_prompt, ours, hf_tokenizer):
    messages = CONVERSATIONS[name]
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == theirs


def test_encode_chat_matches_hf_chat_ids(ours, hf_tokenizer):
    theirs = hf_tokenizer.apply_chat_template(SINGLE_TURN, tokenize=True, add_generation_prompt=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    ids = ours.encode_chat(SINGLE_TURN[0]["content"])
    assert ids == list(theirs)
    # The chat markers are single special tokens, not spelled out in pieces.
    assert ids.count(hf_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def test_tokenizer_fresh_from_gguf_equals_the_cached_one(ours, fresh_from_gguf):
    for text in CORPUS:
        assert fresh_from_gguf.encode(text) == ours.encode(text), text
    assert fresh_from_gguf.chat_template == ours.chat_template
    assert (fresh_from_gguf.bos_token, fresh_from_gguf.eos_token) == (ours.bos_token, ours.eos_token)


def test_tokenizer_from_hf_folder_matches_hf(hf_folder, hf_tokenizer):
    folder_tok = tokenizer_from_hf_folder(hf_folder)
    assert folder_tok is not None
    for text in CORPUS:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert folder_tok.encode(text) == ids, text
        assert folder_tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    assert (folder_tok.bos_token, folder_tok.eos_token) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    for messages in CONVERSATIONS.values():
        assert folder_tok.render_chat(messages) == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_tokenizer_from_hf_folder_reads_a_template_in_tokenizer_config(hf_folder, hf_tokenizer, tmp_path):
    """Older folders (transformers 4) keep the template in tokenizer_config.json, not a .jinja file."""
    jinja = os.path.join(hf_folder, "chat_template.jinja")
    assert os.path.exists(jinja), os.listdir(hf_folder)  # what transformers 5 writes
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(hf_folder, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    with open(tmp_path / "tokenizer_config.json") as f:
        cfg = json.load(f)
    with open(jinja) as f:
        cfg["chat_template"] = f.read()
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    folder_tok = tokenizer_from_hf_folder(str(tmp_path))
    assert folder_tok.render_chat(MULTI_TURN) == hf_tokenizer.apply_chat_template(
        MULTI_TURN, tokenize=False, add_generation_prompt=True)


def test_tokenizer_from_hf_folder_without_tokenizer_is_none(tmp_path):
    assert tokenizer_from_hf_folder(str(tmp_path)) is None


def test_plain_text_gets_the_tokenizers_own_specials_chat_does_not(ours):
    """A tokenizer.json whose post-processor adds BOS (Llama-3's does) adds it to plain prompts,
    as HF's `tokenizer(text)` does, but never on top of a rendered chat template."""
    import tokenizers
    from tokenizers import processors

    from model.tokenizer import TextTokenizer

    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok = TextTokenizer(backend, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "<|im_start|>")
    assert tok.encode("Hello") == [1] + ours.encode("Hello")
    assert tok.encode_chat("Hello") == [1] + ours.encode("Hello")  # BOS once, from the template


def test_template_helpers_hf_templates_use(ours):
    from mesh.errors import WaferError
    from model.tokenizer import TextTokenizer

    tok = TextTokenizer(ours.backend, "{{ strftime_now('%Y') }}|{{ messages | tojson(separators=(',', ':')) }}")
    year, js = tok.render_chat([{"role": "user", "content": "hi"}]).split("|")
    assert year.isdigit() and js == '[{"role":"user","content":"hi"}]'
    with pytest.raises(WaferError, match="chat template"):
        TextTokenizer(ours.backend, "{% if %}").render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(WaferError, match="refused the conversation: no system"):
        TextTokenizer(ours.backend, "{{ raise_exception('no system') }}").render_chat([])
