"""The KV-cache wire format (see kvcache/FORMAT.md): a checksummed header, then one frame per layer.

    prefix   16 B   magic (8) | version u16 | reserved u16 (0) | header length u32   (little endian)
    header   N B    UTF-8 JSON, space-padded so the first frame starts 8-byte aligned
    checksum  8 B   xxh3-64 of prefix + header
    frame l         tag b"KVLF" | layer u32 | payload length u64 | payload | xxh3-64 of tag..payload
                    payload = K then V of layer l, each the logical [K, S, H] in C order

The reader trusts nothing: every length is bounded before anything is allocated, every byte is
under a checksum, and every problem is a `KVStreamError` (a `WaferError`) naming it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np
import xxhash

from kvcache.layout import PrefillKVLayout
from mesh.errors import WaferError
from model.dtypes import DTYPES

if TYPE_CHECKING:  # a type only: kvcache.sequence brings JAX, which the simulator's KV pricing does not need
    from kvcache.sequence import SequenceKV

MAGIC = b"\x89WKV\r\n\x1a\n"  # PNG-style: a non-ASCII byte, and line endings a text-mode copy would mangle
VERSION = 1
PREFIX = struct.Struct("<8sHHI")
CHECKSUM = struct.Struct("<Q")
FRAME_TAG = b"KVLF"
FRAME_PREFIX = struct.Struct("<4sIQ")
HEADER_ALIGN = 8
# Bounds checked before anything is allocated: an absurd length is refused, never honoured.
MAX_HEADER_BYTES = 64 * 1024
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKENS = 1 << 22
MAX_FRAME_BYTES = 1 << 34
# Copy-and-hash granularity: a chunk is hashed right after it is copied, while it is still in L2.
CHUNK_BYTES = 512 * 1024

HEADER_KEYS = {"model", "dtype", "layers", "kv_heads", "head_dim", "tokens", "first_token", "layout"}


class KVStreamError(WaferError):
    """A KV-cache stream that cannot be used: truncated, corrupted, or for another model or layout."""


@dataclasses.dataclass(frozen=True)
class KVHeader:
    model_name: str
    fingerprint: str  # model_fingerprint(): xxh3-128 hex of config and weights
    dtype: str  # wire dtype of the payload
    layers: int  # L
    kv_heads: int  # K (true, unpadded: frames carry the logical layout)
    head_dim: int  # H
    tokens: int  # S: positions per sequence
    first_token: int
    layout: PrefillKVLayout  # where the cache came from

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def layer_bytes(self) -> int:  # one of K or V of one layer
        return self.kv_heads * self.tokens * self.head_dim * self.np_dtype.itemsize

    @property
    def frame_payload_bytes(self) -> int:
        return 2 * self.layer_bytes

    def to_json(self) -> dict:
        return {"model": {"name": self.model_name, "fingerprint": self.fingerprint}, "dtype": self.dtype,
                "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "tokens": self.tokens, "first_token": self.first_token, "layout": self.layout.to_json()}

    def encode(self) -> bytes:
        """prefix + padded JSON + checksum."""
        text = json.dumps(self.to_json(), separators=(",", ":")).encode()
        pad = -(PREFIX.size + len(text) + CHECKSUM.size) % HEADER_ALIGN
        text += b" " * pad
        head = PREFIX.pack(MAGIC, VERSION, 0, len(text)) + text
        return head + CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))

    @property
    def header_bytes(self) -> int:
        return len(self.encode())

    @property
    def stream_bytes(self) -> int:
        frame = FRAME_PREFIX.size + self.frame_payload_bytes + CHECKSUM.size
        return self.header_bytes + self.layers * frame


def header_for(seq: SequenceKV, model_name: str, fingerprint: str, dtype: str | None = None) -> KVHeader:
    """The header of `seq` on the wire; `dtype` converts the payload (only when asked)."""
    wire = dtype or _dtype_name(seq.dtype)
    if wire not in DTYPES:
        raise WaferError(f"wire dtype {wire!r}: expected one of {', '.join(DTYPES)}")
    return KVHeader(model_name, fingerprint, wire, seq.n_layers, seq.layout.kv_heads, seq.head_dim, seq.length,
                    seq.first_token, seq.layout)


def _dtype_name(dt: np.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dt:
            return name
    raise WaferError(f"cache dtype {dt} has no wire name; convert it explicitly to one of {', '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------- writing


class Sink(Protocol):
    def write(self, data: memoryview) -> memoryview | None:
        """Write `data`; return the bytes as written (to hash them from cache) or None."""


def _pieces(a: np.ndarray) -> Iterator[memoryview]:
    """The bytes of `a` in C order as contiguous runs, without copying (views of `a`)."""
    if a.flags.c_contiguous:
        yield memoryview(a.reshape(-1).view(np.uint8))
    elif a.ndim <= 1:
        yield memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    else:
        for i in range(a.shape[0]):
            yield from _pieces(a[i])


def write_frame(seq: SequenceKV, header: KVHeader, layer: int, sink: Sink) -> int:
    """Write frame `layer` (tag, payload, checksum) to `sink`; returns its checksum."""
    prefix = FRAME_PREFIX.pack(FRAME_TAG, layer, header.frame_payload_bytes)
    h = xxhash.xxh3_64(prefix)
    sink.write(memoryview(prefix))
    wire = header.np_dtype
    for a in (seq.k_LKSH[layer], seq.v_LKSH[layer]):
        for part in seq.layout.logical_pieces(seq.host_shards(a)):
            if part.dtype != wire:  # an explicit conversion, asked for in the header
                part = part.astype(wire)
            for piece in _pieces(part):
                for off in range(0, len(piece), CHUNK_BYTES):
                    chunk = piece[off: off + CHUNK_BYTES]
                    written = sink.write(chunk)
                    h.update(chunk if written is None else written)
    checksum = h.intdigest()
    sink.write(memoryview(CHECKSUM.pack(checksum)))
    return checksum


def write_stream(seq: SequenceKV, header: KVHeader, sink: Sink) -> int:
    """Write header and frames of `seq` to `sink`; returns bytes written."""
    sink.write(memoryview(header.encode()))
    for layer in range(seq.n_layers):
        write_frame(seq, header, layer, sink)
    return header.stream_bytes


class _NullSink:
    def write(self, data: memoryview) -> None:
        pass


def frame_checksum(seq: SequenceKV, header: KVHeader, layer: int) -> int:
    """The checksum frame `layer` carries on the wire, computed without writing it."""
    return write_frame(seq, header, layer, _NullSink())


def checksum_of_pieces(header: KVHeader, layer: int, pieces) -> int:
    """The frame checksum of layer `layer` from its logical payload bytes given as pieces (K, then V)."""
    h = xxhash.xxh3_64(FRAME_PREFIX.pack(FRAME_TAG, layer, header.frame_payload_bytes))
    for p in pieces:
        for piece in _pieces(p):
            h.update(piece)
    return h.intdigest()


class BufferSink:
    """Writes into one buffer of at least the stream's size (a fresh one, or the caller's own)."""

    def __init__(self, size: int, out: np.ndarray | None = None):
        if out is not None and (out.dtype != np.uint8 or out.ndim != 1 or len(out) < size):
            raise WaferError(f"output buffer must be a 1-D uint8 array of at least {size} B")
        self.buffer = np.empty(size, np.uint8) if out is None else out[:size]
        self._view = memoryview(self.buffer)
        self.offset = 0

    def write(self, data: memoryview) -> memoryview:
        end = self.offset + len(data)
        dst = self._view[self.offset: end]
        dst[:] = data
        self.offset = end
        return dst


def serialize_kv(seq: SequenceKV, header: KVHeader, out: np.ndarray | None = None) -> memoryview:
    """The whole stream in memory: one buffer, no intermediate concatenation.

    out: a uint8 buffer to write into (reused across sends, it spares the page faults a fresh
    buffer of this size takes on first touch); default a new one."""
    sink = BufferSink(header.stream_bytes, out)
    write_stream(seq, header, sink)
    assert sink.offset == header.stream_bytes
    return memoryview(sink.buffer)


# ---------------------------------------------------------------------------------------- reading


class Source(Protocol):
    def read(self, n: int) -> memoryview:
        """Exactly n bytes (fewer is a KVStreamError naming the truncation)."""

    def remaining(self) -> int | None:
        """Bytes left when known (memory, file), else None (a socket)."""


class MemorySource:
    """Reads a stream held in memory: every read is a view of it (zero copy)."""

    def __init__(self, data):
        self._view = memoryview(data).cast("B")
        self.offset = 0

    def read(self, n: int) -> memoryview:
        if self.offset + n > len(self._view):
            raise KVStreamError(f"stream truncated: {n} bytes wanted at offset {self.offset}, "
                                f"{len(self._view) - self.offset} left")
        out = self._view[self.offset: self.offset + n]
        self.offset += n
        return out

    def remaining(self) -> int:
        return len(self._view) - self.offset


def _check_int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise KVStreamError(f"header field {key}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def read_json_block(source: Source, prefix: bytes, length: int, what: str, keys: set[str]) -> dict:
    """Read `length` bytes of JSON and their xxh3-64 (which covers `prefix` + the JSON) from
    `source`; a bad checksum, bad JSON or other fields than `keys` is a KVStreamError naming `what`.
    The caller has bounded `length`."""
    text = source.read(length)
    (want,) = CHECKSUM.unpack(source.read(CHECKSUM.size))
    h = xxhash.xxh3_64(prefix)
    h.update(text)
    if h.intdigest() != want:
        raise KVStreamError(f"{what} checksum mismatch: the {what} is corrupted")
    try:
        d = json.loads(bytes(text).decode())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an integer too long, nesting too deep
        raise KVStreamError(f"{what} is not valid JSON: {type(e).__name__}: {str(e)[:100]}") from None
    if not isinstance(d, dict) or set(d) != keys:
        got = ", ".join(sorted(d)) if isinstance(d, dict) else type(d).__name__
        raise KVStreamError(f"{what} fields {got}; expected {', '.join(sorted(keys))}")
    return d


def parse_header(source: Source) -> KVHeader:
    """Read and validate the header (magic, version, bounded length, checksum, schema)."""
    prefix = bytes(source.read(PREFIX.size))
    magic, version, reserved, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise KVStreamError(f"not a KV-cache stream: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise KVStreamError(f"KV-cache format version {version} is not supported (this reader: {VERSION})")
    if reserved != 0:
        raise KVStreamError(f"reserved header field is {reserved}, expected 0")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise KVStreamError(f"header size {length} B is outside [2, {MAX_HEADER_BYTES}]")
    d = read_json_block(source, bytes(prefix), length, "header", HEADER_KEYS)
    model = d["model"]
    if (not isinstance(model, dict) or set(model) != {"name", "fingerprint"}
            or not all(isinstance(v, str) and len(v) <= 256 for v in model.values())):
        raise KVStreamError(f"header field model={model!r} is not {{name, fingerprint}}")
    if d["dtype"] not in DTYPES:
        raise KVStreamError(f"header dtype {d['dtype']!r} is not one of {', '.join(DTYPES)}")
    layers = _check_int(d, "layers", 1, MAX_LAYERS)
    kv_heads = _check_int(d, "kv_heads", 1, MAX_KV_HEADS)
    head_dim = _check_int(d, "head_dim", 1, MAX_HEAD_DIM)
    tokens = _check_int(d, "tokens", 1, MAX_TOKENS)
    first = _check_int(d, "first_token", 0, (1 << 31) - 1)
    try:
        layout = PrefillKVLayout.from_json(d["layout"], kv_heads)
    except KVStreamError:
        raise
    except WaferError as e:
        raise KVStreamError(str(e)) from None
    header = KVHeader(model["name"], model["fingerprint"], d["dtype"], layers, kv_heads, head_dim, tokens, first,
                      layout)
    if header.frame_payload_bytes > MAX_FRAME_BYTES:
        raise KVStreamError(f"frame of {header.frame_payload_bytes} B exceeds {MAX_FRAME_BYTES} B")
    return header


@dataclasses.dataclass(frozen=True)
class LayerFrame:
    layer: int
    k_KSH: np.ndarray  # logical [K, S, H] in the wire dtype (a view of the received bytes)
    v_KSH: np.ndarray
    checksum: int  # the frame's xxh3-64, verified


class KVReader:
    """Parses a stream from `source`: `header` at once, then `frames()` one verified layer at a time."""

    def __init__(self, source: Source):
        self.source = source
        self.header = parse_header(source)
        left = source.remaining()
        want = self.header.stream_bytes - self.header.header_bytes
        if left is not None and left != want:
            what = "truncated" if left < want else "has trailing bytes"
            raise KVStreamError(f"stream {what}: {left} B after the header, the header declares {want} B")

    def frames(self) -> Iterator[LayerFrame]:
        hd = self.header
        shape = (hd.kv_heads, hd.tokens, hd.head_dim)
        for layer in range(hd.layers):
            prefix = bytes(self.source.read(FRAME_PREFIX.size))
            tag, index, size = FRAME_PREFIX.unpack(prefix)
            if tag != FRAME_TAG:
                raise KVStreamError(f"layer {layer}: frame tag {tag!r}, expected {FRAME_TAG!r}")
            if index != layer:
                raise KVStreamError(f"frame for layer {index} where layer {layer} was due")
            if size != hd.frame_payload_bytes:
                raise KVStreamError(f"layer {layer}: frame of {size} B, the header declares {hd.frame_payload_bytes} B")
            payload = self.source.read(size)
            (want,) = CHECKSUM.unpack(self.source.read(CHECKSUM.size))
            h = xxhash.xxh3_64(prefix)
            h.update(payload)
            if h.intdigest() != want:
                raise KVStreamError(f"layer {layer}: checksum mismatch, the frame is corrupted")
            kv = np.frombuffer(payload, hd.np_dtype).reshape((2,) + shape)
            yield LayerFrame(layer, kv[0], kv[1], want)


def read_frames(data) -> tuple[KVHeader, list[LayerFrame]]:
    """Parse a whole in-memory stream (every frame verified)."""
    reader = KVReader(MemorySource(data))
    return reader.header, list(reader.frames())


def frame_checksums(source: Source) -> tuple[KVHeader, list[str]]:
    """The header and each frame's checksum, verified (for `wafer kv inspect`)."""
    reader = KVReader(source)
    return reader.header, [f"{frame.checksum:016x}" for frame in reader.frames()]


def convert_frame(a: np.ndarray, dtype: np.dtype, allow: bool) -> np.ndarray:
    """`a` as `dtype`: a no-op when equal; a conversion only when `allow` (an explicit request)."""
    if a.dtype == dtype:
        return a
    if not allow:
        raise KVStreamError(f"stream dtype {a.dtype} differs from the cache's {dtype}; conversion was not requested")
    return a.astype(dtype)

