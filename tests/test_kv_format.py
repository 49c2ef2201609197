"""The KV-cache wire format: exact round trips in memory and through files, tokens identical to a
single-process run after the handoff, dtype conversion only on request, and clean refusals of
every kind of bad stream (with a hypothesis fuzz) that leave the decode batch as it was."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.format import (
    CHECKSUM,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    KVReader,
    KVStreamError,
    MemorySource,
    frame_checksums,
    read_frames,
    serialize_kv,
)
from kvcache.landing import KVLanding
from kvcache.transport import FileSource, write_kv_file
from mesh.errors import WaferError
from mesh.executors import Executor, Grid
from tests.helpers.kv_fixtures import (
    NEW_TOKENS,
    PROMPT,
    assert_state_unchanged,
    busy_decoder,
    decode_after_landing,
    decoder_state,
    export,
    solo_tokens,
    tiny,
)


@pytest.fixture(scope="module")
def qwen2():
    return tiny("tiny-qwen2")


@pytest.fixture(scope="module")
def stream(qwen2):
    seq, header = export(*qwen2)
    return seq, header, bytes(serialize_kv(seq, header))


def test_round_trip_is_byte_exact(stream):
    seq, header, data = stream
    assert len(data) == header.stream_bytes
    assert data[:8] == MAGIC
    got_header, frames = read_frames(data)
    assert got_header == header
    assert [f.layer for f in frames] == list(range(seq.n_layers))
    for f in frames:
        k, v = seq.logical_layer(f.layer)
        assert f.k_KSH.tobytes() == k.tobytes() and f.v_KSH.tobytes() == v.tobytes()
    # Frames are views of the received bytes, not copies.
    assert not frames[0].k_KSH.flags.owndata


def test_prefill_mesh_layout_gives_the_same_frames(qwen2, stream):
    """A prompt prefilled on 2 tensor-parallel devices (tiny has 2 KV heads, one per column)
    serializes to frames of the same logical [K, S, H] as on one device; the header's layout
    differs. The values agree to float32 rounding: the 2-device prefill sums the attention and
    MLP outputs of its columns in another order (measured below 1e-6)."""
    seq2, header2 = export(*qwen2, prefill_grid=Grid(1, 2))
    assert header2.layout.grid == Grid(1, 2)
    data2 = bytes(serialize_kv(seq2, header2))
    _, header, data = stream
    assert len(data2) - header2.header_bytes == len(data) - header.header_bytes
    _, frames2 = read_frames(data2)
    _, frames = read_frames(data)
    assert [f.layer for f in frames2] == [f.layer for f in frames]
    for f2, f in zip(frames2, frames):
        np.testing.assert_allclose(f2.k_KSH, f.k_KSH, rtol=0, atol=1e-5)
        np.testing.assert_allclose(f2.v_KSH, f.v_KSH, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, prefill, decode", [
    ("tiny-qwen2", "1x1", "2x2"), pytest.param("tiny-llama", "1x2", "3x3", marks=pytest.mark.slow),
    ("tiny-qwen2", "1x2", "1x4"),  # decode columns outnumber KV heads: each head on two columns
    pytest.param("tiny-llama", "1x1", "5x2", marks=pytest.mark.slow)])
def test_file_handoff_decodes_exactly(name, prefill, decode, tmp_path):
    params, config = tiny(name)
    want = solo_tokens(params, config, PROMPT)
    seq, header = export(params, config, prefill_grid=Grid.parse(prefill))
    path = str(tmp_path / "seq.kv")
    assert write_kv_file(seq, header, path) == header.stream_bytes
    executor = Executor.VCORES if Grid.parse(decode).cores > 9 else Executor.DEVICES
    dec = busy_decoder(params, config, decode, executor=executor)
    with FileSource(path) as source:
        slot = KVLanding(dec).land(KVReader(source))
    assert slot == 1
    assert decode_after_landing(dec, slot, seq.first_token) == want


def test_landing_while_other_slots_decode(qwen2):
    """Slot 0 keeps decoding between the layers of slot 1's stream; both get their solo tokens."""
    from tests.helpers.kv_fixtures import OTHER_PROMPT
    params, config = qwen2
    other = solo_tokens(params, config, OTHER_PROMPT, NEW_TOKENS + 8)
    want = solo_tokens(params, config, PROMPT)
    dec = busy_decoder(params, config)  # slot 0: first token + 2 steps
    seq, header = export(params, config)
    got0 = []
    slot = KVLanding(dec).land(KVReader(MemorySource(serialize_kv(seq, header))),
                               between_layers=lambda layer: got0.append(int(dec.step()[0])))
    assert got0 and not dec.free_slots()
    tokens1 = [seq.first_token]
    for _ in range(NEW_TOKENS - 1):
        out = dec.step()
        got0.append(int(out[0]))
        tokens1.append(int(out[slot]))
    assert tokens1 == want
    assert other[3:3 + len(got0)] == got0


def test_dtype_conversion_only_on_request(qwen2):
    params, config = qwen2
    seq, header = export(params, config, dtype="bfloat16")
    data = serialize_kv(seq, header)
    h, frames = read_frames(data)
    assert h.dtype == "bfloat16" and frames[0].k_KSH.dtype == ml_dtypes.bfloat16
    assert np.array_equal(frames[0].k_KSH, seq.logical_layer(0)[0].astype(ml_dtypes.bfloat16))
    dec = busy_decoder(params, config)
    before = decoder_state(dec)
    with pytest.raises(WaferError, match="conversion was not requested"):
        KVLanding(dec).land(KVReader(MemorySource(data)))
    assert_state_unchanged(before, dec)
    slot = KVLanding(dec, convert_dtype=True).land(KVReader(MemorySource(data)))
    assert dec.active[slot]
    with pytest.raises(WaferError, match="wire dtype 'int8'"):
        export(params, config, dtype="int8")


def test_inspect_checksums(stream):
    seq, header, data = stream
    h, sums = frame_checksums(MemorySource(data))
    assert h == header and len(sums) == seq.n_layers and all(len(s) == 16 for s in sums)


# ------------------------------------------------------------------------------- bad streams


def rewrite_header(data: bytes, edit) -> bytes:
    """A stream whose header JSON was edited by `edit(dict)` and re-checksummed (so only the
    semantic checks can catch it)."""
    _, version, _, length = PREFIX.unpack(data[:PREFIX.size])
    d = json.loads(data[PREFIX.size: PREFIX.size + length])
    edit(d)
    text = json.dumps(d).encode()
    text += b" " * (-(PREFIX.size + len(text) + CHECKSUM.size) % 8)
    head = PREFIX.pack(MAGIC, version, 0, len(text)) + text
    return head + CHECKSUM.pack(xxhash.xxh3_64_intdigest(head)) + data[PREFIX.size + length + CHECKSUM.size:]


def rewrite_prefix(data: bytes, magic=MAGIC, version=1, reserved=0, length=None) -> bytes:
    n = PREFIX.unpack(data[:PREFIX.size])[3]
    return PREFIX.pack(magic, version, reserved, n if length is None else length) + data[PREFIX.size:]


def _set(path, value):
    def edit(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


HEADER_EDITS = [
    (("model", "fingerprint"), "0" * 32, "model mismatch"),
    (("layers",), 3, "stream truncated"),  # the declared size disagrees first
    (("kv_heads",), 1, "layout mismatch"),  # 1 head would pad to 1, the layout says 2
    (("head_dim",), 8, "has trailing bytes"),
    (("tokens",), 4, "header declares"),
    (("tokens",), 10 ** 9, "tokens=1000000000 is not an integer"),
    (("first_token",), 10 ** 6, "first token 1000000 is outside the vocabulary"),
    (("first_token",), -1, "first_token=-1"),
    (("dtype",), "int4", "dtype 'int4'"),
    (("layers",), True, "layers=True"),
    (("layout", "grid"), [1, 3], "layout mismatch"),
    (("layout", "axes", "K"), None, "layout mismatch"),
    (("layout", "mesh"), "decode", "layout mismatch"),
]


def bad_streams(data: bytes, header) -> list:
    """(label, stream, expected message) for every named kind of damage."""
    frame0 = header.header_bytes
    cases = [("empty", b"", "truncated"),
             ("truncated header", data[:frame0 - 3], "truncated"),
             ("truncated frame", data[:len(data) - 100], "truncated"),
             ("trailing bytes", data + b"\0", "trailing bytes"),
             ("wrong magic", rewrite_prefix(data, magic=b"GGUF\0\0\0\0"), "not a KV-cache stream"),
             ("wrong version", rewrite_prefix(data, version=2), "version 2 is not supported"),
             ("reserved", rewrite_prefix(data, reserved=1), "reserved header field"),
             ("absurd header size", rewrite_prefix(data, length=0xFFFFFFFF), f"outside [2, {MAX_HEADER_BYTES}]"),
             ("flipped header byte", data[:40] + bytes([data[40] ^ 1]) + data[41:], "header checksum mismatch"),
             ("flipped payload byte", data[:frame0 + 50] + bytes([data[frame0 + 50] ^ 0x80]) + data[frame0 + 51:],
              "layer 0: checksum mismatch"),
             ("flipped frame tag", data[:frame0] + b"XVLF" + data[frame0 + 4:], "frame tag"),
             ("frames out of order", data[:frame0 + 4] + struct.pack("<I", 1) + data[frame0 + 8:],
              "frame for layer 1 where layer 0 was due"),
             ("header is not JSON", _raw_header(data, b"{" * 100), "not valid JSON"),
             ("header nested too deep", _raw_header(data, b"[" * 60000), "not valid JSON: RecursionError"),
             ("header with a 5000-digit integer", _raw_header(data, b"1" * 5000), "not valid JSON: ValueError"),
             ("header is a list", _raw_header(data, b"[1, 2]"), "header fields list")]
    for path, value, message in HEADER_EDITS:
        cases.append((f"edit {'.'.join(path)}={value!r}", rewrite_header(data, _set(path, value)), message))
    return cases


def _raw_header(data: bytes, text: bytes) -> bytes:
    """The stream with its header JSON replaced by `text`, correctly checksummed."""
    n = PREFIX.unpack(data[:PREFIX.size])[3]
    head = PREFIX.pack(MAGIC, 1, 0, len(text)) + text
    return head + CHECKSUM.pack(xxhash.xxh3_64_intdigest(head)) + data[PREFIX.size + n + CHECKSUM.size:]


def land_bytes(landing, data) -> None:
    landing.land(KVReader(MemorySource(data)))


@pytest.fixture(scope="module")
def busy(qwen2):
    dec = busy_decoder(*qwen2)
    return dec, KVLanding(dec), decoder_state(dec)


def test_every_bad_stream_is_refused_cleanly(stream, busy):
    _, header, data = stream
    dec, landing, before = busy
    for label, bad, message in bad_streams(data, header):
        with pytest.raises(KVStreamError, match=message.replace("[", r"\[").replace("(", r"\(")):
            land_bytes(landing, bad)
        assert_state_unchanged(before, dec)
        assert dec.free_slots() == [1], label


def test_a_sequence_too_long_for_the_decoder_is_refused(stream, busy):
    import dataclasses
    _, header, _ = stream
    with pytest.raises(KVStreamError, match="64 tokens leaves no room in this decoder.s cache of 64"):
        busy[1].check(dataclasses.replace(header, tokens=64))
    assert busy[0].free_slots() == [1]


def test_a_stream_for_another_model_is_refused(stream):
    params, config = tiny("tiny-qwen2", seed=4)  # same shapes, other weights
    dec = busy_decoder(params, config)
    before = decoder_state(dec)
    with pytest.raises(KVStreamError, match="model mismatch"):
        land_bytes(KVLanding(dec), stream[2])
    assert_state_unchanged(before, dec)


@st.composite
def corruptions(draw, data: bytes, header):
    kind = draw(st.sampled_from(["truncate", "flip", "flips", "edit", "splice"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind in ("flip", "flips"):
        out = bytearray(data)
        n = 1 if kind == "flip" else draw(st.integers(2, 8))
        for i in draw(st.sets(st.integers(0, len(data) - 1), min_size=n, max_size=n)):  # distinct: no flip undoes another
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "splice":  # random bytes over a random stretch
        i = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        out = data[:i] + junk + data[i + len(junk):]
        return out if out != data else out + b"\0"
    path, value, _ = draw(st.sampled_from(HEADER_EDITS))
    return rewrite_header(data, _set(path, value))


def _fuzz(stream, busy):
    _, header, data = stream
    dec, landing, _ = busy

    @given(corruptions(data, header))
    def check(bad):
        assert bad != data
        with pytest.raises(WaferError):
            land_bytes(landing, bad)
        assert dec.free_slots() == [1]
        assert not dec._landing

    return check


def test_fuzz_corruptions_are_refused(stream, busy):
    check = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)(
        _fuzz(stream, busy))
    check()
    assert_state_unchanged(busy[2], busy[0])


@pytest.mark.slow
def test_fuzz_corruptions_are_refused_heavy(stream, busy):
    check = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)(
        _fuzz(stream, busy))
    check()
    assert_state_unchanged(busy[2], busy[0])


@pytest.mark.parametrize("arch, prefill, decode", [
    ("mistral", "1x2", "2x3"),  # head dim 32 != D / N
    pytest.param("llama3", "1x2", "3x1", marks=pytest.mark.slow),
    pytest.param("qwen2", "2x2", "1x4", marks=pytest.mark.slow)])
def test_random_hf_checkpoints_hand_off_exactly(arch, prefill, decode, tmp_path):
    from model.load import load_model
    from tests.helpers import hf_checkpoints
    writer = {"mistral": hf_checkpoints.write_mistral, "llama3": hf_checkpoints.write_llama3,
              "qwen2": lambda p: hf_checkpoints.write_qwen2(p, tie=True)}[arch]
    loaded = load_model(checkpoint=writer(str(tmp_path / arch)), use_cache=False)
    params, config = loaded.params, loaded.config
    want = solo_tokens(params, config, PROMPT)
    assert len(set(want)) > 3
    seq, header = export(params, config, prefill_grid=Grid.parse(prefill))
    path = str(tmp_path / "seq.kv")
    write_kv_file(seq, header, path)
    dec = busy_decoder(params, config, decode)
    with FileSource(path) as source:
        slot = KVLanding(dec).land(KVReader(source))
    assert decode_after_landing(dec, slot, seq.first_token) == want
