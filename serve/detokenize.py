"""Token ids to streamed text, one token at a time, and stop strings cut out of that stream.

Byte-level BPE tokens are bytes, not characters: a multi-byte UTF-8 character (é, 東, 🙂) can span
two or more tokens, and decoding a token that ends mid-character gives U+FFFD. The decoder here
is the one HF's TextStreamer and vLLM's `detokenize_incrementally` use: keep the ids since the
last emitted text (plus a few before them for context), decode that window, and emit only the
part after what was already emitted, and only once it no longer ends in U+FFFD.

The context ids matter for tokenizers whose decoders drop or add a leading space depending on
position (SentencePiece's "▁"): text decoded in context spaces the same as the whole output does.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"
# Prompt ids decoded ahead of the first output token, for spacing (vLLM uses the same 5).
CONTEXT_IDS = 5


class IncrementalDetokenizer:
    """Text deltas of a growing list of output ids that never split a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # Context from the prompt's tail, shortened until it decodes to whole characters (a prompt
        # of raw ids may end mid-character; its bytes must not merge into the first output text).
        context: list[int] = []
        for n in range(min(CONTEXT_IDS, len(prompt_ids)), 0, -1):
            tail = list(prompt_ids[-n:])
            if REPLACEMENT not in self._decode(tail):
                context = tail
                break
        self.ids = context
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(context)  # ids before this are already in the emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The new text the output gained with `token` ("" while a character is incomplete)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """What is held back when the output ends. Trailing U+FFFD (the output stopped
        mid-character, at the token limit) is dropped: those bytes never became a character."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):].rstrip(REPLACEMENT)


class StopStrings:
    """Cuts a text stream at the first stop string, holding back text that may begin one.

    Text is released as soon as no stop string can start in it, so a stream without stop strings
    is never delayed; a stop string split over several tokens is still found, and never leaks.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Text safe to send after `text` arrives; once a stop string matched, always ""."""
        if self.matched is not None:
            return ""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf
        cut = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut is None or i < cut[0]):
                cut = (i, s)
        if cut is not None:
            self.matched = cut[1]
            self.held = ""
            return buf[:cut[0]]
        keep = self._partial_stop_len(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """Held text when the stream ends without a stop string (it never became one)."""
        out, self.held = self.held, ""
        return "" if self.matched is not None else out
