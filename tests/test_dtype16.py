"""16-bit weights, activations and caches (`--dtype`): what is stored in 16 bits, what the planner
and profiler count, the KV handoff between decoders of one dtype or two, and (slow) greedy tokens
against HF transformers run in the same dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kvcache.format import KVReader, MemorySource, read_frames, serialize_kv
from kvcache.landing import KVLanding
from kvcache.sequence import model_fingerprint
from mesh.errors import WaferError
from mesh.executors import Grid
from mesh.planner import plan_sram
from mesh.wafer import emulated_spec
from model.config import preset
from model.dtypes import cast_params, resolve_dtype
from model.generate import Generator
from model.sampling import Sampling
from model.trace_decode import stage_bytes
from model.wafer_layout import WaferLayout
from tests.helpers.kv_fixtures import PROMPT, busy_decoder, decode_after_landing, export, tiny

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def qwen2_f32():
    return tiny("tiny-qwen2")


@pytest.fixture(scope="module")
def qwen2_bf16(qwen2_f32):
    params, config = qwen2_f32
    return cast_params(params, BF16), config


def test_resolve_dtype_default_and_refusal():
    assert resolve_dtype(None) == np.float32  # the tests run on CPU: float32 is the default there
    assert resolve_dtype("bfloat16") == BF16
    with pytest.raises(WaferError, match="dtype 'int8': expected one of float32, bfloat16, float16"):
        resolve_dtype("int8")


# --------------------------------------------------------------------------- planner, profiler


@pytest.mark.parametrize("name, grid", [("smollm2-135m", Grid(4, 4)), ("llama3-8b", Grid(64, 64))])
def test_bytes_per_core_halve_in_16_bit(name, grid):
    """Weights, KV cache and the activations between kernels halve; scores and logits stay float32."""
    layout = WaferLayout(preset(name), grid, 4096)
    spec = emulated_spec(1 << 62)
    plans = {dt: plan_sram(layout.tensor_specs(2, dt), grid.rows, grid.cols, spec) for dt in ("float32", "bfloat16")}
    f32, bf16 = (plans[dt].bytes_by_kind() for dt in ("float32", "bfloat16"))
    assert f32["weight"] > 0 and f32["kv"] > 0
    assert bf16["weight"] * 2 == f32["weight"] and bf16["kv"] * 2 == f32["kv"]
    by_name = {dt: {s.name: s.local_bytes for s in layout.tensor_specs(2, dt)} for dt in ("float32", "bfloat16")}
    for buf in ("x", "qkv", "gate_up"):
        assert by_name["bfloat16"][buf] * 2 == by_name["float32"][buf], buf
    for buf in ("scores", "logits"):
        assert by_name["bfloat16"][buf] == by_name["float32"][buf], buf
    # The profiler reads the same description (`wafer profile --dtype`).
    one, half = stage_bytes(layout, 2, "float32"), stage_bytes(layout, 2, "bfloat16")
    assert half.layer * 2 == one.layer and half.head * 2 == one.head


@pytest.fixture(scope="module")
def dec16(qwen2_bf16):
    """A bfloat16 2x2 decode batch of 4 slots, slot 0 busy (every test lands in its own slot)."""
    return busy_decoder(*qwen2_bf16, batch=4)


def test_mesh_decoder_holds_16_bit_state(dec16):
    """The mesh tiles and caches and the SRAM plan are bfloat16."""
    assert dec16.dtype == BF16
    assert all(a.dtype == BF16 for a in dec16.k_cache + dec16.v_cache)
    assert dec16.tiles["layers"][0]["w_qkv"].dtype == BF16
    layout = dec16.layout
    f32_plan = plan_sram(layout.tensor_specs(4), layout.grid.rows, layout.grid.cols, emulated_spec(1 << 62))
    assert dec16.plan.bytes_by_kind()["weight"] * 2 == f32_plan.bytes_by_kind()["weight"]


# ------------------------------------------------------------------------------------ KV handoff


def test_fingerprint_is_the_same_in_float32_and_bfloat16(qwen2_f32, qwen2_bf16):
    assert model_fingerprint(*reversed(qwen2_f32)) == model_fingerprint(*reversed(qwen2_bf16))
    other = cast_params(tiny("tiny-qwen2", seed=4)[0], BF16)
    assert model_fingerprint(qwen2_bf16[1], other) != model_fingerprint(qwen2_bf16[1], qwen2_bf16[0])


def test_bf16_round_trip_is_bit_exact_and_decodes(qwen2_f32, qwen2_bf16, dec16):
    """A bfloat16 prefill's cache goes on the wire as bfloat16 (half float32's payload), comes back
    bit for bit, lands in a bfloat16 decode batch exactly as written, and decodes there as a
    bfloat16 single-device decoder (whose cache is bfloat16 too) does from the same prompt."""
    params, config = qwen2_bf16
    seq, header = export(params, config)
    assert header.dtype == "bfloat16"
    data = bytes(serialize_kv(seq, header))
    got, frames = read_frames(data)
    assert got == header
    for f in frames:
        k, v = seq.logical_layer(f.layer)
        assert k.dtype == BF16 and f.k_KSH.tobytes() == k.tobytes() and f.v_KSH.tobytes() == v.tobytes()
    _, f32_header = export(*qwen2_f32)
    assert header.frame_payload_bytes * 2 == f32_header.frame_payload_bytes  # per-frame framing aside
    slot = KVLanding(dec16).land(KVReader(MemorySource(data)))
    landed = [dec16.kv_layout.from_cores(np.asarray(a)[:, :, slot], seq.length) for a in dec16.k_cache]
    for i, k in enumerate(landed):
        assert k.dtype == BF16 and k.tobytes() == seq.logical_layer(i)[0].tobytes(), i
    mesh_tokens = decode_after_landing(dec16, slot, seq.first_token, 6)
    dec16.evict(slot)
    gen = Generator(params, config)
    pre = gen.prefill([PROMPT], 64, Sampling())
    assert all(a.dtype == BF16 for a in pre.cache.k_LBKSH + pre.cache.v_LBKSH)
    single = gen.continue_from(pre.first_B, pre.cache, [len(PROMPT)], 6, stop_on_eos=False).tokens[0]
    # Random weights of std 0.2 keep the logits far apart: the two bf16 paths agree at the start.
    assert mesh_tokens[:3] == single[:3]


def test_dtype_mismatch_is_refused_or_converted_explicitly(qwen2_f32, qwen2_bf16, dec16):
    """A bfloat16 stream into a float32 decoder (and the reverse) is refused with the reason and the
    fix, and lands converted when asked; never reinterpreted."""
    params16, config = qwen2_bf16
    seq, header = export(params16, config)
    data = bytes(serialize_kv(seq, header))
    dec32 = busy_decoder(*qwen2_f32)
    with pytest.raises(WaferError, match="stream dtype bfloat16 differs from the decode cache's float32; "
                                         "conversion was not requested"):
        KVLanding(dec32).land(KVReader(MemorySource(data)))
    slot = KVLanding(dec32, convert_dtype=True).land(KVReader(MemorySource(data)))
    k0 = dec32.kv_layout.from_cores(np.asarray(dec32.k_cache[0])[:, :, slot], seq.length)
    assert k0.dtype == np.float32 and np.array_equal(k0, seq.logical_layer(0)[0].astype(np.float32))
    seq32, header32 = export(*qwen2_f32)
    with pytest.raises(WaferError, match="stream dtype float32 differs from the decode cache's bfloat16"):
        KVLanding(dec16).land(KVReader(MemorySource(bytes(serialize_kv(seq32, header32)))))
    k32 = [seq.logical_layer(i)[0].astype(np.float32) for i in range(seq.n_layers)]
    v32 = [seq.logical_layer(i)[1].astype(np.float32) for i in range(seq.n_layers)]
    with pytest.raises(WaferError, match="cache dtype float32 differs from the decode batch's bfloat16"):
        dec16.insert(1, k32, v32, seq.length, seq.first_token)
