"""Wafer decode on real and virtual meshes: HF-exact tokens, planner = placed bytes, slots."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.allreduce import Schedule
from mesh.errors import WaferError
from mesh.executors import Executor, Grid, make_core_mesh
from mesh.wafer import emulated_spec
from model.cache import empty_cache
from model.cache_layout import cache_to_decode_layout
from model.config import SMOLLM2_135M, TINY_LLAMA, TINY_QWEN2
from model.forward import forward
from model.generate import CACHE_BUCKET, Generator
from mesh.extent import round_up
from model.sampling import Sampling
from model.wafer_decode import MeshOptions
from model.wafer_generate import WaferDecoder
from model.wafer_layout import LayoutMode, WaferLayout
from model.weights import init_random_params

NEW_TOKENS = 32

# (grid, executor) pairs the issue asks for; the default run takes one per schedule, the slow
# run every pair under every schedule.
DEVICE_GRIDS = ["1x1", "1x4", "2x2", "2x4", "3x3", "4x4"]
VCORE_GRIDS = ["8x8", "16x16"]
# 3x3 ring and 8x8 vcores run in the slow set: the 2x9 vcores ring case (split groups) and the
# full-grid checkpoints under every schedule keep both in the default run, which must stay within
# CI's budget.
FAST_CASES = [("2x2", Executor.DEVICES, Schedule.PSUM), ("2x4", Executor.DEVICES, Schedule.KTREE)]
ALL_CASES = [(g, Executor.DEVICES, s) for g in DEVICE_GRIDS for s in Schedule] + \
            [(g, Executor.VCORES, s) for g in VCORE_GRIDS for s in Schedule]
SLOW_CASES = [c for c in ALL_CASES if c not in FAST_CASES]


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    return smollm2.tokenizer.encode_chat("Write a short poem about the sea.")


@pytest.fixture(scope="module")
def hf_tokens(hf_smollm2, chat_prompt):
    from bench.hf_peer import hf_greedy
    return hf_greedy(hf_smollm2, [chat_prompt], NEW_TOKENS)[0]


def wafer_tokens(loaded, prompt, grid, executor, schedule, batch=1, new_tokens=NEW_TOKENS, mode=LayoutMode.AUTO):
    dec = WaferDecoder(loaded.params, loaded.config, make_core_mesh(Grid.parse(grid), executor), batch,
                       len(prompt) + new_tokens, MeshOptions(schedule), mode=mode)
    return dec.generate([prompt], new_tokens, stop_on_eos=False).tokens[0]


def _check_mesh(smollm2, chat_prompt, hf_tokens, grid, executor, schedule, mode=LayoutMode.AUTO):
    assert len(set(hf_tokens)) > 5  # a varied continuation: a wrong decoder cannot match by luck
    assert wafer_tokens(smollm2, chat_prompt, grid, executor, schedule, mode=mode) == hf_tokens


@pytest.mark.parametrize("grid, executor, schedule", FAST_CASES, ids=lambda v: getattr(v, "value", v))
def test_smollm2_mesh_matches_hf(smollm2, chat_prompt, hf_tokens, grid, executor, schedule):
    _check_mesh(smollm2, chat_prompt, hf_tokens, grid, executor, schedule)


@pytest.mark.slow
@pytest.mark.parametrize("grid, executor, schedule", SLOW_CASES, ids=lambda v: getattr(v, "value", v))
def test_smollm2_every_mesh_matches_hf(smollm2, chat_prompt, hf_tokens, grid, executor, schedule):
    _check_mesh(smollm2, chat_prompt, hf_tokens, grid, executor, schedule)


# The heads layout (mode HEADS) with more columns than KV heads: SmolLM2 (K 3, G 3) splits each
# group's query heads over rep columns,
# each holding a copy of the KV head. (grid, executor, schedule, rep, gc): 6 columns -> rep 2, gc 2
# (one zero query head per group); 9 columns -> rep 3, gc 1. The default run keeps 1x6 (vcores and
# ring are checked against HF by the padded-mesh test above).
SPLIT_CASES = [("1x6", Executor.DEVICES, Schedule.PSUM, 2, 2),
               pytest.param("2x6", Executor.DEVICES, Schedule.KTREE, 2, 2, marks=pytest.mark.slow),
               pytest.param("2x9", Executor.VCORES, Schedule.RING, 3, 1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("grid, executor, schedule, rep, gc", SPLIT_CASES, ids=lambda v: getattr(v, "value", v))
def test_smollm2_split_kv_groups_matches_hf(smollm2, chat_prompt, hf_tokens, grid, executor, schedule, rep, gc):
    layout = WaferLayout(smollm2.config, Grid.parse(grid), 64, mode=LayoutMode.HEADS)
    assert (layout.kc, layout.gc, layout.rep) == (1, gc, rep)
    _check_mesh(smollm2, chat_prompt, hf_tokens, grid, executor, schedule, LayoutMode.HEADS)


def test_column_heads_by_hand():
    """SmolLM2: 9 query heads in 3 groups of 3 (heads 0-2 share KV head 0, 3-5 KV head 1, ...)."""
    heads = lambda g: [WaferLayout(SMOLLM2_135M, Grid.parse(g), 64, mode=LayoutMode.HEADS).column_heads(c)
                       for c in range(Grid.parse(g).cols)]
    # 2 columns: whole groups, KV heads padded to 4 (old layout, kc 2).
    assert heads("1x2") == [([0, 1], [0, 1, 2, 3, 4, 5]), ([2, None], [6, 7, 8, None, None, None])]
    # 6 columns: rep 2, gc 2, the second column of each group holds one real and one zero head.
    assert heads("1x6") == [([0], [0, 1]), ([0], [2, None]), ([1], [3, 4]), ([1], [5, None]), ([2], [6, 7]),
                            ([2], [8, None])]
    # 7 columns: the same split, column 6 holds no head.
    assert heads("1x7")[6] == ([None], [None, None])
    # 9 columns: rep 3, gc 1, no padding; 4 columns: 4 // 3 = 1 column per group, whole groups.
    assert heads("2x9") == [([h // 3], [h]) for h in range(9)]
    assert heads("1x4") == [([0], [0, 1, 2]), ([1], [3, 4, 5]), ([2], [6, 7, 8]), ([None], [None] * 3)]


def test_cache_to_decode_layout_replicates_kv_heads():
    """KV head h (filled with h + 1) lands on both of its columns; positions p -> row p % 2, slot p // 2."""
    layout = WaferLayout(SMOLLM2_135M, Grid(2, 6), 8, mode=LayoutMode.HEADS)  # s = 4 slots per row + scratch
    H = SMOLLM2_135M.head_dim
    k = np.broadcast_to((np.arange(3) + 1.0)[:, None, None] * (1 + np.arange(5))[None, :, None], (3, 5, H))
    out = cache_to_decode_layout(k, layout)
    assert out.shape == (2, 6, 1, 5, H)
    for c, h in enumerate([0, 0, 1, 1, 2, 2]):
        np.testing.assert_array_equal(out[0, c, 0, :, 0], (h + 1) * np.array([1, 3, 5, 0, 0]))
        np.testing.assert_array_equal(out[1, c, 0, :, 0], (h + 1) * np.array([2, 4, 0, 0, 0]))


@pytest.mark.slow  # ~40 s; padding of every kind is also exercised by the 2x9, 1x6 and full-grid cases
def test_padding_never_changes_tokens(smollm2, chat_prompt, hf_tokens):
    """576 wide over 5 rows (pads to 580), 3 KV heads / 9 query heads over 2 columns (pad to 4 / 12),
    vocabulary 49152 over 7 columns would not divide either: all padded, same tokens."""
    assert wafer_tokens(smollm2, chat_prompt, "5x2", Executor.VCORES, Schedule.PSUM) == hf_tokens
    assert wafer_tokens(smollm2, chat_prompt, "1x7", Executor.VCORES, Schedule.RING, new_tokens=16,
                        mode=LayoutMode.HEADS) == hf_tokens[:16]


# Each case costs minutes on CI's 2 cores; the default run keeps 2x2 (full layout under AUTO).
@pytest.mark.parametrize("grid, mode", [("2x2", LayoutMode.AUTO),
                                        pytest.param("2x6", LayoutMode.HEADS, marks=pytest.mark.slow),
                                        pytest.param("1x12", LayoutMode.FULL, marks=pytest.mark.slow)],
                         ids=lambda v: getattr(v, "value", v))
def test_logits_match_single_device(smollm2, chat_prompt, grid, mode):
    """The wafer step's logits against the single-device forward at the same position
    (2x6 heads: query heads split over columns, KV heads replicated; 1x12 full: head dims split
    over segments of 4 columns)."""
    cfg, params = smollm2.config, smollm2.params
    dec = WaferDecoder(params, cfg, make_core_mesh(Grid.parse(grid), Executor.DEVICES), 1, len(chat_prompt) + 8,
                       MeshOptions(Schedule.KTREE), mode=mode)
    tokens = dec.generate([chat_prompt], 2, stop_on_eos=False).tokens[0]
    wafer = dec.last_logits()[0]
    seq = chat_prompt + tokens[:1]
    cache = empty_cache(cfg.n_layers, 1, cfg.n_kv_heads, 128, cfg.head_dim)
    padded = jnp.asarray([seq + [0] * (128 - len(seq))], jnp.int32)
    ref, _ = forward(params, cfg, padded, jnp.zeros((1,), jnp.int32), jnp.asarray([len(seq) - 1]), cache)
    ref = np.asarray(ref[0])
    # Different float32 summation orders over 576-wide dots, 30 layers deep: we measured ~1e-5
    # relative; 1e-4 of the largest logit leaves room for other machines and schedules.
    assert np.abs(wafer - ref).max() <= 1e-4 * np.abs(ref).max()
    assert int(np.argmax(wafer)) == tokens[1]


def test_qwen2_checkpoint_on_non_square_mesh(tmp_path):
    """Random-weight Qwen2 (QKV bias, tied head) from a transformers checkpoint on a 2x3 mesh."""
    from bench.hf_peer import hf_greedy, load_hf_model
    from model.load import load_model
    from tests.helpers.hf_checkpoints import write_qwen2

    path = write_qwen2(str(tmp_path / "qwen2"), tie=True)
    loaded = load_model(checkpoint=path, use_cache=False)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, loaded.config.vocab_size, 11)]
    want = hf_greedy(load_hf_model(path), [prompt], NEW_TOKENS)[0]
    assert len(set(want)) > 5
    for executor in (Executor.DEVICES, Executor.VCORES):
        assert wafer_tokens(loaded, prompt, "2x3", executor, Schedule.KTREE) == want


def test_qwen2_checkpoint_split_groups_pad_query_heads(tmp_path):
    """Random-weight Qwen2 with 6 query heads over 2 KV heads (G 3, QKV bias): on 2x4 each group
    splits over 2 columns of 2 query heads (one zero head each); on 1x7 over 3 columns of one,
    column 6 holding no head."""
    from bench.hf_peer import hf_greedy, load_hf_model
    from model.load import load_model
    from tests.helpers.hf_checkpoints import write_qwen2

    path = write_qwen2(str(tmp_path / "qwen2"), tie=False, num_attention_heads=6, hidden_size=96)
    loaded = load_model(checkpoint=path, use_cache=False)
    assert (loaded.config.n_heads, loaded.config.n_kv_heads, loaded.config.head_dim) == (6, 2, 16)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, loaded.config.vocab_size, 9)]
    want = hf_greedy(load_hf_model(path), [prompt], NEW_TOKENS)[0]
    assert len(set(want)) > 5
    for grid, executor, rep, gc in (("2x4", Executor.DEVICES, 2, 2), ("1x7", Executor.VCORES, 3, 1)):
        layout = WaferLayout(loaded.config, Grid.parse(grid), 64, mode=LayoutMode.HEADS)
        assert (layout.rep, layout.gc) == (rep, gc)
        assert wafer_tokens(loaded, prompt, grid, executor, Schedule.KTREE, mode=LayoutMode.HEADS) == want


@pytest.mark.parametrize("grid, mode", [("2x3", LayoutMode.AUTO), ("2x6", LayoutMode.HEADS), ("2x6", LayoutMode.FULL),
                                        ("1x5", LayoutMode.FULL)], ids=lambda v: getattr(v, "value", v))
def test_planner_equals_placed_bytes(grid, mode):
    """2x6 heads: 2 KV heads over 6 columns, each replicated on 2 columns, 2 columns of padding;
    2x6 full: 2 segments of 3 columns, 6 of H = 16 each; 1x5 full: 5 columns do not divide 16."""
    cfg = TINY_QWEN2
    g = Grid.parse(grid)
    dec = WaferDecoder(init_random_params(cfg), cfg, make_core_mesh(g, Executor.DEVICES), 3, 100, mode=mode)
    placed = {}
    for a in jax.tree.leaves((dec.tiles, dec.k_cache, dec.v_cache)):
        for shard in a.addressable_shards:
            placed[shard.device] = placed.get(shard.device, 0) + shard.data.nbytes
    by_kind = dec.plan.bytes_by_kind()
    assert len(placed) == g.rows * g.cols
    assert set(placed.values()) == {by_kind["weight"] + by_kind["kv"]}


def test_planner_by_hand_split_groups():
    """TINY_QWEN2 on 2x4 (4 columns > 2 KV heads): per core d 32, one KV head (replicated on 2
    columns), one query head, f 40, v 128, s 32."""
    cfg = TINY_QWEN2
    dec = WaferDecoder(init_random_params(cfg), cfg, make_core_mesh(Grid(2, 4), Executor.VCORES), 1, 64,
                       mode=LayoutMode.HEADS)
    assert (dec.layout.kc, dec.layout.gc, dec.layout.rep) == (1, 1, 2)
    qkv = (1 + 2 * 1) * 16  # 48 columns: 1 q head + k + v of one KV head
    per_layer = 4 * (32 + 32 * qkv + qkv + 1 * 16 * 32 + 32 + 32 * 80 + 40 * 32)
    weights = 2 * per_layer + 4 * (32 + 32 * 128)
    kv = 2 * 2 * 4 * (1 * 1 * (32 + 1) * 16)
    assert dec.plan.bytes_by_kind()["weight"] == weights == 4 * (2 * 6000 + 4128)
    assert dec.plan.bytes_by_kind()["kv"] == kv == 8448


def test_planner_by_hand():
    """TINY_QWEN2 (D 64, F 160, 4 heads / 2 KV heads of 16, V 512, 2 layers, tied, bias) on 2x2,
    batch 1, 64 positions: per core d 32, one KV head, 2 query heads, f 80, v 256, s 32."""
    cfg = TINY_QWEN2
    dec = WaferDecoder(init_random_params(cfg), cfg, make_core_mesh(Grid(2, 2), Executor.VCORES), 1, 64)
    qkv = (2 + 2 * 1) * 16  # 64 columns: 2 q heads + k + v of one KV head
    per_layer = 4 * (32 + 32 * qkv + qkv + 2 * 16 * 32 + 32 + 32 * 160 + 80 * 32)
    weights = 2 * per_layer + 4 * (32 + 32 * 256)
    kv = 2 * 2 * 4 * (1 * 1 * (32 + 1) * 16)  # 32 positions + the scratch slot
    assert dec.plan.bytes_by_kind()["weight"] == weights == 4 * (2 * 10880 + 8224)
    assert dec.plan.bytes_by_kind()["kv"] == kv == 8448


def test_plan_that_does_not_fit_names_the_problem():
    cfg = TINY_QWEN2
    with pytest.raises(WaferError, match=r"core \(0, 0\) needs [\d,]+ B of 49,152 B \(short by [\d,]+ B\); largest tensor lm \(32, 256\)"):
        WaferDecoder(init_random_params(cfg), cfg, make_core_mesh(Grid(2, 2), Executor.VCORES), 1, 64,
                     spec=emulated_spec(48 * 1024))


@pytest.mark.parametrize("grid", ["2x2", "2x6"])
def test_slots_insert_evict_and_keep_decoding(grid):
    """Three slots: sequences join and leave mid-run; each gets exactly its solo tokens (2x6: the
    full-grid layout, caches landing as head-dim slices)."""
    cfg = TINY_QWEN2
    params = init_random_params(cfg, seed=3, scale=0.2)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (5, 9, 3)]
    solo = [Generator(params, cfg).generate([p], 12, stop_on_eos=False).tokens[0] for p in prompts]
    assert len({tuple(s) for s in solo}) == 3

    dec = WaferDecoder(params, cfg, make_core_mesh(Grid.parse(grid), Executor.DEVICES), 3, 64)
    assert dec.layout.seg == {"2x2": 1, "2x6": 3}[grid]
    pre = Generator(params, cfg)

    def insert(i):
        prefilled = pre.prefill([prompts[i]], 32, Sampling())
        first, cache = prefilled.first_B, prefilled.cache
        slot = dec.free_slots()[0]
        dec.insert(slot, [k[0] for k in cache.k_LBKSH], [v[0] for v in cache.v_LBKSH], len(prompts[i]),
                   int(np.asarray(first)[0]))
        return slot, [int(np.asarray(first)[0])]

    runs = {0: insert(0)}
    for step in range(11 + 6):
        if step == 3:
            runs[1] = insert(1)
        if step == 6:
            runs[2] = insert(2)
        out = dec.step()
        for i, (slot, toks) in runs.items():
            if dec.active[slot]:
                toks.append(int(out[slot]))
                if len(toks) == 12:
                    dec.evict(slot)
    assert [runs[i][1] for i in range(3)] == solo
    assert dec.free_slots() == [0, 1, 2]


def test_insert_refuses_bad_slots():
    cfg = TINY_QWEN2
    dec = WaferDecoder(init_random_params(cfg), cfg, make_core_mesh(Grid(1, 2), Executor.VCORES), 1, 64)
    kv = [np.zeros((cfg.n_kv_heads, 4, cfg.head_dim), np.float32)] * cfg.n_layers
    with pytest.raises(WaferError, match="outside the decode batch"):
        dec.insert(1, kv, kv, 4, 0)
    dec.insert(0, kv, kv, 4, 0)
    with pytest.raises(WaferError, match="slot 0 is occupied"):
        dec.insert(0, kv, kv, 4, 0)


STRESS_SCRIPT = """
import json, sys
from mesh.devices import ensure_cpu_devices
ensure_cpu_devices(64)
import numpy as np
from kernels.allreduce import Schedule
from mesh.executors import Executor, Grid, make_core_mesh
from model.config import TINY_LLAMA
from model.generate import CACHE_BUCKET, Generator
from mesh.extent import round_up
from model.wafer_decode import MeshOptions
from model.wafer_generate import WaferDecoder
from model.weights import init_random_params
params = init_random_params(TINY_LLAMA, seed=5, scale=0.2)
prompt = list(range(3, 10))
steps = int(sys.argv[1])
dec = WaferDecoder(params, TINY_LLAMA, make_core_mesh(Grid(8, 8), Executor.DEVICES), 2, len(prompt) + steps,
                   MeshOptions(Schedule[sys.argv[2]]))
got = dec.generate([prompt], steps, stop_on_eos=False).tokens[0]
want = Generator(params, TINY_LLAMA).generate([prompt], steps, stop_on_eos=False).tokens[0]
print(json.dumps({"equal": got == want, "n": len(got)}))
"""


@pytest.mark.parametrize("schedule", ["PSUM", pytest.param("KTREE", marks=pytest.mark.slow)])
def test_64_device_mesh_many_steps_without_hang(schedule):
    """An 8x8 mesh of 64 emulated CPU devices for 200 steps on this small machine: the setup in
    mesh/devices.py (thread pool >= 2 x devices) must keep XLA's CPU collectives from deadlocking."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", STRESS_SCRIPT, "200", schedule], capture_output=True, text=True,
                          timeout=900, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"equal": True, "n": 200}


# The full-grid layout: more columns than query heads, each head's dimension split over a segment
# of columns. SmolLM2 (N 9, K 3, H 64) on 12 columns: 3 segments of 4 columns, one KV group each,
# 16 of the 64 dims per column; on 36: 3 segments of 12 (hc 2 * ceil(32 / 12) = 6, 72 dims for
# 64: 12 columns do not divide a head); on 72: 3 of 24 (hc 4).
FULL_GRIDS = {"1x12": (4, 16), "2x12": (4, 16), "4x36": (12, 6), "8x72": (24, 4)}


def _full_grid_layout(config, grid, max_len):
    """The layout `wafer_tokens` builds for a cache of `max_len` positions, checked: full, no idle column."""
    layout = WaferLayout(config, Grid.parse(grid), round_up(max_len, CACHE_BUCKET))
    assert (layout.seg, layout.hc) == FULL_GRIDS[grid]
    assert all(any(h is not None for h in heads) for heads in layout.q_heads_by_column)  # no idle column
    return layout


def test_smollm2_full_grid_1x12_matches_hf(smollm2, chat_prompt, hf_tokens):
    _full_grid_layout(smollm2.config, "1x12", len(chat_prompt) + NEW_TOKENS)
    _check_mesh(smollm2, chat_prompt, hf_tokens, "1x12", Executor.DEVICES, Schedule.PSUM)


@pytest.mark.slow
@pytest.mark.parametrize("grid, schedule", [("4x36", Schedule.RING), ("8x72", Schedule.KTREE)],
                         ids=lambda v: getattr(v, "value", v))
def test_smollm2_full_grid_vcores_matches_hf(smollm2, chat_prompt, hf_tokens, grid, schedule):
    _full_grid_layout(smollm2.config, grid, len(chat_prompt) + NEW_TOKENS)
    _check_mesh(smollm2, chat_prompt, hf_tokens, grid, Executor.VCORES, schedule)


FULL_GRID_SCRIPT = """
import json, sys
from mesh.devices import ensure_cpu_devices
ensure_cpu_devices(24)
from kernels.allreduce import Schedule
from mesh.executors import Executor, Grid, make_core_mesh
from model.load import load_model
from model.wafer_decode import MeshOptions
from model.wafer_generate import WaferDecoder
loaded = load_model("smollm2-135m")
prompt, n = json.loads(sys.argv[1]), int(sys.argv[2])
dec = WaferDecoder(loaded.params, loaded.config, make_core_mesh(Grid(2, 12), Executor.DEVICES), 1, len(prompt) + n,
                   MeshOptions(Schedule[sys.argv[3]]))
print(json.dumps({"seg": dec.layout.seg, "tokens": dec.generate([prompt], n, stop_on_eos=False).tokens[0]}))
"""


@pytest.mark.slow
def test_smollm2_full_grid_2x12_devices_matches_hf(smollm2, chat_prompt, hf_tokens):
    """24 emulated devices: more than this session's 16, so in a subprocess (as the 64-device test)."""
    _full_grid_layout(smollm2.config, "2x12", len(chat_prompt) + NEW_TOKENS)
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", FULL_GRID_SCRIPT, json.dumps(chat_prompt), str(NEW_TOKENS), "KTREE"],
                          capture_output=True, text=True, timeout=1500, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"seg": 4, "tokens": hf_tokens}


@pytest.mark.parametrize("arch, grid, seg, hc", [("llama3", "2x6", 3, 6), ("qwen2", "2x8", 4, 4)])
def test_checkpoints_full_grid_every_schedule_match_hf(tmp_path, arch, grid, seg, hc):
    """Random Llama-3 (N 4, K 2, H 16) on 2x6: 2 segments of 3 columns, 6 dims each (18 for 16:
    3 columns do not divide the head). Random Qwen2 (N 6, K 2, H 16, QKV bias, untied) on 2x8:
    2 segments of 4 columns, 4 dims of one KV group (3 query heads) on each."""
    from bench.hf_peer import hf_greedy, load_hf_model
    from model.load import load_model
    from tests.helpers.hf_checkpoints import write_llama3, write_qwen2

    path = (write_llama3(str(tmp_path / arch)) if arch == "llama3" else
            write_qwen2(str(tmp_path / arch), tie=False, num_attention_heads=6, hidden_size=96))
    loaded = load_model(checkpoint=path, use_cache=False)
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, loaded.config.vocab_size, 10)]
    layout = WaferLayout(loaded.config, Grid.parse(grid), round_up(len(prompt) + NEW_TOKENS, CACHE_BUCKET))
    assert (layout.seg, layout.hc) == (seg, hc)
    want = hf_greedy(load_hf_model(path), [prompt], NEW_TOKENS)[0]
    assert len(set(want)) > 5
    for schedule in Schedule:
        assert wafer_tokens(loaded, prompt, grid, Executor.DEVICES, schedule) == want, schedule


def test_one_head_spanning_every_column():
    """WaferLLM's decode configs: one head, head_dim = dim. Here D = H = 64 on 1x12 (one segment of
    all 12 columns, 3 rotary pairs = 6 dims each: 72 for 64) against the single-device decoder, and
    Llama3-8B's WaferLLM shape (D = H = 4200) on 420x420: 10 dims on every column, no padding."""
    import dataclasses
    cfg = dataclasses.replace(TINY_LLAMA, name="one-head", dim=64, n_heads=1, n_kv_heads=1, head_dim=64)
    layout = WaferLayout(cfg, Grid(1, 12), 64)
    assert (layout.seg, layout.segments, layout.kc, layout.gc, layout.hc) == (12, 1, 1, 1, 6)
    params = init_random_params(cfg, seed=7, scale=0.2)
    prompt = list(range(5, 14))
    want = Generator(params, cfg).generate([prompt], 16, stop_on_eos=False).tokens[0]
    assert len(set(want)) > 3
    for schedule in (Schedule.PSUM, Schedule.KTREE):
        dec = WaferDecoder(params, cfg, make_core_mesh(Grid(1, 12), Executor.VCORES), 1, 64, MeshOptions(schedule))
        assert dec.generate([prompt], 16, stop_on_eos=False).tokens[0] == want, schedule
    big = dataclasses.replace(cfg, dim=4200, n_heads=1, n_kv_heads=1, head_dim=4200, ffn_dim=14700, max_seq_len=4096)
    layout = WaferLayout(big, Grid(420, 420), 4096)
    assert (layout.seg, layout.hc) == (420, 10)
    assert all(None not in dims for dims in layout.dims_by_column)
