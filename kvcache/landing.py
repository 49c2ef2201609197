"""Landing a KV-cache stream in a free slot of a decode batch, layer by layer as frames arrive.

The stream is checked against the decoder before a slot is reserved (model fingerprint, shapes,
dtype, room in the cache), then each verified frame goes straight to the decode mesh. Any failure
on the way (a corrupt frame, a peer gone) gives the slot back and leaves every other slot as it
was: the reserved slot is inactive, so nothing the decode steps read or write has changed.
"""

from __future__ import annotations

import numpy as np

from kvcache.format import KVHeader, KVReader, KVStreamError, convert_frame
from kvcache.sequence import model_fingerprint


class KVLanding:
    """Receives streams into a decode slot batch (`model.slot_batch.SlotBatch`; the model's fingerprint
    is computed once)."""

    def __init__(self, decoder, convert_dtype: bool = False):
        """convert_dtype: accept a stream whose dtype differs from the decode cache's (the decoder's
        `dtype`), converting each frame; without it such a stream is refused, never reinterpreted."""
        self.decoder = decoder
        self.fingerprint = model_fingerprint(decoder.config, decoder.params)
        self.convert_dtype = convert_dtype

    def check(self, header: KVHeader) -> None:
        """Refuse a stream this decoder cannot continue, before anything is reserved."""
        cfg = self.decoder.config
        if header.fingerprint != self.fingerprint:
            raise KVStreamError(f"model mismatch: the stream was made by {header.model_name!r} "
                                f"(fingerprint {header.fingerprint[:16]}...), this decoder runs {cfg.name!r} "
                                f"({self.fingerprint[:16]}...)")
        got = (header.layers, header.kv_heads, header.head_dim)
        want = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
        if got != want:
            raise KVStreamError(f"model mismatch: stream layers/KV heads/head dim {got}, model {want}")
        if header.np_dtype != self.decoder.dtype and not self.convert_dtype:
            raise KVStreamError(f"stream dtype {header.dtype} differs from the decode cache's "
                                f"{np.dtype(self.decoder.dtype).name}; conversion was not requested "
                                f"(`wafer kv import --convert-dtype`, or decode with --dtype {header.dtype})")
        if header.tokens >= self.decoder.capacity:
            raise KVStreamError(f"sequence of {header.tokens} tokens leaves no room in this decoder's cache of "
                                f"{self.decoder.capacity}")
        if header.first_token >= cfg.vocab_size:
            raise KVStreamError(f"first token {header.first_token} is outside the vocabulary [0, {cfg.vocab_size})")

    def land(self, reader: KVReader, slot: int | None = None, between_layers=None, sampling=None) -> int:
        """Place the stream of `reader` in `slot` (None: the first free one) and start decoding it.

        between_layers: called after each layer is placed (e.g. to run decode steps of the other
        slots while later layers are in flight).
        sampling: how the sequence's tokens are chosen (`model.sampling.Sampling`; None: greedy).
        Returns the slot.
        """
        header = reader.header
        self.check(header)
        slot = self.decoder.reserve(slot, header.tokens, header.first_token, sampling)
        try:
            for frame in reader.frames():
                k = convert_frame(frame.k_KSH, self.decoder.dtype, self.convert_dtype)
                v = convert_frame(frame.v_KSH, self.decoder.dtype, self.convert_dtype)
                self.decoder.place_layer(slot, frame.layer, k, v)
                if between_layers is not None:
                    between_layers(frame.layer)
            self.decoder.commit(slot)
        except BaseException:
            self.decoder.abort(slot)
            raise
        return slot
