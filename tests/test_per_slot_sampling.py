"""Per-sequence sampling: greedy and sampled sequences share a decode batch and a prefill batch,
and each gets exactly the tokens it gets alone (batch composition never changes a request)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lm_head import TOPK_CANDIDATES, sample_mesh
from kernels.sampling import sample_ref
from mesh.axes import COL
from mesh.errors import WaferError
from mesh.executors import Executor, Grid, make_core_mesh
from mesh.tensor_spec import tile_to_cores
from model.config import TINY_LLAMA
from model.generate import Generator
from model.prefill import Prefiller
from model.sampling import Sampling
from model.wafer_decode import MeshOptions
from model.wafer_generate import WaferDecoder
from model.weights import init_random_params

# One row per way of choosing: greedy, top-k from the candidates, top-k past the candidates (the
# gathered logits), nucleus alone (gathered logits), top-k with top-p (candidates).
ROW_KNOBS = [(0.0, 0, 1.0), (0.8, 5, 1.0), (1.0, TOPK_CANDIDATES + 10, 1.0), (1.5, 0, 0.9), (1.2, 12, 0.7)]
NEW_TOKENS = 12


def _keys(seed: int, n: int):
    return jax.random.split(jax.random.key(seed), n)


def test_sample_ref_rows_follow_their_own_knobs():
    """Each row of a mixed batch is the token sample_ref gives that row alone with its knobs."""
    B, V = len(ROW_KNOBS), 200
    logits = np.random.default_rng(0).normal(size=(B, V)).astype(np.float32) * 3
    t, k, p = (np.asarray(x) for x in zip(*ROW_KNOBS))
    f = jax.jit(sample_ref, static_argnames="greedy")
    for seed in range(5):
        keys = _keys(seed, B)
        mixed = np.asarray(f(logits, keys, t.astype(np.float32), k.astype(np.int32), p.astype(np.float32),
                             greedy=False))
        for i, (ti, ki, pi) in enumerate(ROW_KNOBS):
            alone = f(logits[i:i + 1], keys[i:i + 1], jnp.float32(ti), jnp.int32(ki), jnp.float32(pi),
                      greedy=ti == 0)
            assert mixed[i] == int(alone[0]), (seed, i)
        assert mixed[0] == logits[0].argmax()


@pytest.mark.parametrize("executor", [Executor.DEVICES, Executor.VCORES])
def test_sample_mesh_rows_follow_their_own_knobs(executor):
    """Sharded selection with per-row knobs: each row equals the same row selected alone (greedy:
    the argmax; sampled: the path its own top-k takes), the same on every core, and the token
    `sample_ref` draws on one device with the same key."""
    grid = Grid(1, 4)
    cm = make_core_mesh(grid, executor)
    B, V = len(ROW_KNOBS), 300  # v = 75 per column, more than TOPK_CANDIDATES
    logits = np.random.default_rng(1).normal(size=(B, V)).astype(np.float32) * 3
    placed = cm.place(tile_to_cores(logits, grid, col_axis=1))

    def core(l, seed, t, k, p):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(B))
        return sample_mesh(l, COL, V, keys, t, k, p, greedy=False)

    f = jax.jit(cm.run(core))
    knobs = [cm.broadcast(np.asarray(x, dt)) for x, dt in zip(zip(*ROW_KNOBS), (np.float32, np.int32, np.float32))]
    drawn = set()
    for seed in range(4):
        s = cm.broadcast(np.uint32(seed))
        mixed = np.asarray(f(placed, s, *knobs))
        assert (mixed == mixed[0, 0]).all()
        for i, row in enumerate(ROW_KNOBS):
            alone = [cm.broadcast(np.full(B, x, dt)) for x, dt in zip(row, (np.float32, np.int32, np.float32))]
            assert mixed[0, 0, i] == np.asarray(f(placed, s, *alone))[0, 0, i], (seed, i)
        assert mixed[0, 0, 0] == logits[0].argmax()
        # The very token the single-device sampler draws from the whole vocabulary, on every path.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(B))
        t, k, p = (np.asarray(x, dt) for x, dt in zip(zip(*ROW_KNOBS), (np.float32, np.int32, np.float32)))
        np.testing.assert_array_equal(mixed[0, 0], np.asarray(sample_ref(logits, keys, t, k, p, greedy=False)))
        drawn.add(tuple(mixed[0, 0, 1:]))
    assert len(drawn) > 1  # the seed reaches the sampled rows


@pytest.fixture(scope="module")
def tiny():
    return TINY_LLAMA, init_random_params(TINY_LLAMA, seed=3, scale=0.2)


PROMPTS = [[5, 9, 2, 7, 1], [11, 300, 42], list(range(20, 29))]
SAMPLINGS = [Sampling(), Sampling(temperature=0.8, top_k=20, seed=1), Sampling(temperature=1.2, top_p=0.9, seed=2)]


def test_prefill_first_token_per_prompt(tiny):
    """A list of Samplings: each prompt's first token is the one it gets prefilled alone."""
    cfg, params = tiny
    prefiller = Prefiller(params, cfg, make_core_mesh(Grid(2, 2), Executor.DEVICES))
    mixed = prefiller.prefill(PROMPTS, SAMPLINGS)
    for i, (p, s) in enumerate(zip(PROMPTS, SAMPLINGS)):
        assert mixed.first_tokens[i] == prefiller.prefill([p], s).first_tokens[0], i
    assert mixed.first_tokens[0] == mixed.logits_BV[0].argmax()
    with pytest.raises(WaferError, match="2 samplings for 3 prompts"):
        prefiller.prefill(PROMPTS, SAMPLINGS[:2])


# vcores: ~2x the devices run on 2 CPUs (the kernel test above covers per-row selection there).
@pytest.mark.parametrize("executor", [Executor.DEVICES, pytest.param(Executor.VCORES, marks=pytest.mark.slow)])
def test_mixed_batch_equals_solo_runs(tiny, executor):
    """Greedy and sampled slots decode together, joining at different steps; each slot's tokens
    are its request's solo run (sampled: WaferDecoder.generate alone; greedy: the single-device
    generator too), and a seeded request repeats."""
    cfg, params = tiny
    solo_dec = WaferDecoder(params, cfg, make_core_mesh(Grid(2, 2), executor), 3, 64, MeshOptions(greedy=False))
    solo = [solo_dec.generate([p], NEW_TOKENS, s, stop_on_eos=False).tokens[0] for p, s in zip(PROMPTS, SAMPLINGS)]
    assert solo[0] == Generator(params, cfg).generate([PROMPTS[0]], NEW_TOKENS, stop_on_eos=False).tokens[0]
    # The test can fail: another seed draws other tokens, the same seed the same ones.
    assert solo_dec.generate([PROMPTS[1]], NEW_TOKENS, SAMPLINGS[1], stop_on_eos=False).tokens[0] == solo[1]
    reseeded = Sampling(temperature=0.8, top_k=20, seed=9)
    assert solo_dec.generate([PROMPTS[1]], NEW_TOKENS, reseeded, stop_on_eos=False).tokens[0] != solo[1]

    dec = solo_dec  # every slot free again; one compiled step for both
    assert dec.free_slots() == [0, 1, 2]
    pre = dec.prefiller.prefill(PROMPTS, SAMPLINGS)

    def insert(i):
        k, v = pre.sequence_kv(i)
        slot = dec.free_slots()[-1]  # not the slot the solo runs used
        dec.insert(slot, k, v, len(PROMPTS[i]), int(pre.first_tokens[i]), SAMPLINGS[i])
        return slot, [int(pre.first_tokens[i])]

    runs = {2: insert(2)}
    for step in range(NEW_TOKENS - 1 + 5):
        if step == 2:
            runs[0] = insert(0)
        if step == 5:
            runs[1] = insert(1)
        out = dec.step()  # each slot with its own Sampling
        for slot, toks in runs.values():
            if dec.active[slot]:
                toks.append(int(out[slot]))
                if len(toks) == NEW_TOKENS:
                    dec.evict(slot)
    assert [runs[i][1] for i in range(3)] == solo


def test_greedy_decoder_refuses_a_sampled_slot(tiny):
    cfg, params = tiny
    dec = WaferDecoder(params, cfg, make_core_mesh(Grid(1, 2), Executor.VCORES), 2, 64)
    with pytest.raises(WaferError, match="compiled for greedy decoding"):
        dec.reserve(0, 4, 0, Sampling(temperature=1.0))
    assert dec.free_slots() == [0, 1]


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_uint32_is_refused(seed):
    with pytest.raises(WaferError, match="seed must be in 0..4294967295"):
        Sampling(temperature=1.0, seed=seed)
