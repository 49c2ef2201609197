"""Text tokenizer and chat template, built from the same source as the weights.

A GGUF file carries a byte-level BPE vocabulary, its merges and a Jinja chat template; an HF
checkpoint folder carries `tokenizer.json` and a template in `tokenizer_config.json` (or
`chat_template.jinja`). Both become a `tokenizers.Tokenizer` plus a template rendered with a
sandboxed Jinja environment, so no PyTorch or transformers code runs on the product path.
"""

from __future__ import annotations

import datetime
import json
import os

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from mesh.errors import WaferError

# GGUF token_type value for control tokens (<|im_start|> and friends): these are matched as
# whole special tokens in text and skipped when decoding for display.
GGUF_TOKEN_TYPE_CONTROL = 3


class TextTokenizer:
    """Encode text, decode ids, render chat prompts."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain text, with the tokenizer's own special tokens (a Llama-3
        tokenizer.json adds BOS, as HF's `tokenizer(text)` does; SmolLM2's GGUF adds none)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template (as HF `apply_chat_template` does)."""
        if not self.chat_template:
            raise WaferError("this model has no chat template; drop --chat")
        # The same environment options HF transformers renders templates with.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise WaferError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, user_text: str) -> list[int]:
        # The rendered template already holds every special token (HF tokenizes it the same way).
        return self.encode(self.render_chat([{"role": "user", "content": user_text}]), add_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({
            "backend": self.backend.to_str(), "chat_template": self.chat_template,
            "bos_token": self.bos_token, "eos_token": self.eos_token,
        })

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        d = json.loads(text)
        return cls(tokenizers.Tokenizer.from_str(d["backend"]), d["chat_template"],
                   d["bos_token"], d["eos_token"])


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's `tojson` filter: json.dumps with its keyword arguments."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str):
    raise WaferError(f"chat template refused the conversation: {message}")


def tokenizer_from_gguf_fields(fields: dict) -> TextTokenizer:
    """Build the tokenizer from GGUF metadata (`tokenizer.ggml.*`), byte-level BPE only.

    Mirrors what HF transformers builds from the same file: a BPE model over the GGUF vocabulary
    and merges, a byte-level pre-tokenizer without a prefix space, control tokens as specials.
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise WaferError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_TYPE_CONTROL]
    backend.add_special_tokens(specials)

    def token(key):
        i = fields.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return TextTokenizer(backend, fields.get("tokenizer.chat_template"),
                         token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def tokenizer_from_hf_folder(folder: str) -> TextTokenizer | None:
    """The tokenizer of an HF checkpoint folder, or None when the folder ships none."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise WaferError(f"{path}: not a valid tokenizer.json ({e})") from None
    cfg = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()

    def token(key):
        t = cfg.get(key)
        return t.get("content") if isinstance(t, dict) else t

    return TextTokenizer(backend, template, token("bos_token"), token("eos_token"))
