"""Per-core kernels on real meshes against their plain references, and hand-checked plans."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels.allreduce import Schedule, allreduce, allreduce_ref, ktree_plan
from kernels.attention import decode_attention_mesh, gqa_attention_ref
from kernels.lm_head import argmax_mesh
from kernels.mesh_gemv import mesh_gemv, mesh_gemv_ref
from kernels.rmsnorm import rmsnorm_gemv_mesh, rmsnorm_ref
from mesh.axes import COL, ROW
from mesh.executors import Executor, Grid, make_core_mesh
from mesh.tensor_spec import tile_to_cores

EXECUTORS = [Executor.DEVICES, Executor.VCORES]


def test_tile_to_cores_by_hand():
    a = np.arange(12).reshape(4, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    t = tile_to_cores(a, Grid(2, 3), row_axis=0, col_axis=1)
    assert t.shape == (2, 3, 2, 1) and t[1, 2].tolist() == [[8], [11]] and t[0, 1].tolist() == [[1], [4]]
    t = tile_to_cores(a, Grid(2, 3), col_axis=1)  # replicated over the rows
    assert t.shape == (2, 3, 4, 1) and t[1, 0].tolist() == t[0, 0].tolist() == [[0], [3], [6], [9]]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize("rows, cols", [(1, 4), (2, 2), (4, 4), (3, 5)])
def test_allreduce_sums_and_agrees_everywhere(executor, schedule, rows, cols):
    if executor is Executor.DEVICES and rows * cols > 16:
        pytest.skip("more cores than the 16 emulated devices")
    grid = Grid(rows, cols)
    cm = make_core_mesh(grid, executor)
    x = np.random.default_rng(0).standard_normal((rows, cols, 3, 5)).astype(np.float32)
    for axis, a in ((ROW, 0), (COL, 1)):
        y = np.asarray(jax.jit(cm.run(lambda v: allreduce(v, axis, schedule)))(cm.place(x)))
        # float32 sums of <= 5 terms in some order: within a few ulps of the float64 sum.
        np.testing.assert_allclose(y, np.broadcast_to(x.astype(np.float64).sum(a, keepdims=True), x.shape),
                                   rtol=1e-5, atol=1e-6)
        # Every core along the axis holds the bit-identical total (cores never drift apart).
        first = np.take(y, [0], axis=a)
        assert (y == first).all()


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule), ids=lambda s: s.value)
@pytest.mark.parametrize("cols, segment", [(8, 4), (7, 3), (6, 6)])
def test_segmented_allreduce_matches_reference(executor, schedule, cols, segment):
    """Each run of `segment` columns sums on its own (7 = 2 x 3 + 1: core 6 keeps its value;
    6 of 6: the plain all-reduce); devices use psum's groups, vcores the masked psum."""
    cm = make_core_mesh(Grid(2, cols), executor)
    x = np.random.default_rng(1).standard_normal((2, cols, 3)).astype(np.float32)
    y = np.asarray(jax.jit(cm.run(lambda v: allreduce(v, COL, schedule, segment=segment)))(cm.place(x)))
    want = np.stack([allreduce_ref(x[r], segment) for r in range(2)])
    # float32 sums of <= 4 terms in some order: a few ulps.
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_allreduce_ref_by_hand():
    x = np.arange(7.0)[:, None]
    assert allreduce_ref(x, 3)[:, 0].tolist() == [3, 3, 3, 12, 12, 12, 6]
    assert allreduce_ref(x)[:, 0].tolist() == [21] * 7


def test_ktree_plan_by_hand():
    # 8 cores, 2 groups {0..3} {4..7}; group roots are the middles 2 and 6; the top root is 6.
    plan = ktree_plan(8, 2)
    assert plan.root == 6
    assert plan.reduce_steps == [
        [[(0, 1), (4, 5)], [(3, 2), (7, 6)]],  # chains from both ends of each group
        [[(1, 2), (5, 6)]],
        [[(2, 6)]],  # roots reduce toward the top root
    ]
    assert plan.broadcast_steps == [[[(6, 2)]], [[(2, 1), (6, 5)]], [[(1, 0), (5, 4)], [(2, 3), (6, 7)]]]
    # One group: a plain chain toward the middle; n groups of one core: a chain over roots.
    assert ktree_plan(3, 1).reduce_steps == [[[(0, 1)], [(2, 1)]]]
    assert ktree_plan(3, 3).reduce_steps == [[[(0, 1)], [(2, 1)]]]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule))
def test_mesh_gemv_chain_matches_reference(executor, schedule):
    grid = Grid(2, 3)
    cm = make_core_mesh(grid, executor)
    rng = np.random.default_rng(1)
    B, D, F = 2, 8, 9  # D over 2 rows, F over 3 columns
    x = rng.standard_normal((B, D)).astype(np.float32)
    w1 = rng.standard_normal((D, F)).astype(np.float32)  # W1[D_row, F_col]
    w2 = rng.standard_normal((F, D)).astype(np.float32)  # W2[F_col, D_row]

    def core(x_Bd, w1_df, w2_fd):
        y_Bf = mesh_gemv(x_Bd, w1_df, ROW, schedule)  # reduce over rows -> y[F_col]
        return mesh_gemv(y_Bf, w2_fd, COL, schedule)  # reduce over columns -> z[D_row]

    z = jax.jit(cm.run(core))(cm.place(_x_by_rows(x, grid)), cm.place(tile_to_cores(w1, grid, 0, 1)),
                              cm.place(tile_to_cores(w2, grid, 1, 0)))
    want = mesh_gemv_ref(mesh_gemv_ref(x, w1), w2)
    got = np.concatenate([np.asarray(z)[r, 0] for r in range(grid.rows)], axis=-1)
    # Two chained float32 GEMVs of width <= 9: relative-norm error at float32 rounding level.
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def _x_by_rows(x_BD: np.ndarray, grid: Grid) -> np.ndarray:
    """x[D_row]: each row's slice of D, replicated over columns -> [R, C, B, D/R]."""
    return tile_to_cores(x_BD, grid, row_axis=1)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule))
def test_rmsnorm_gemv_mesh_with_padding(executor, schedule):
    grid = Grid(3, 2)
    cm = make_core_mesh(grid, executor)
    rng = np.random.default_rng(2)
    D, O = 10, 4  # D padded to 12 over 3 rows, O over 2 columns
    x = rng.standard_normal((2, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    W = rng.standard_normal((D, O)).astype(np.float32)
    xp, wp, Wp = np.pad(x, ((0, 0), (0, 2))), np.pad(w, (0, 2)), np.pad(W, ((0, 2), (0, 0)))
    out = jax.jit(cm.run(lambda xx, ww, WW: rmsnorm_gemv_mesh(xx, ww, WW, 1e-5, D, ROW, schedule)))(
        cm.place(tile_to_cores(xp, grid, row_axis=1)), cm.place(tile_to_cores(wp, grid, row_axis=0)),
        cm.place(tile_to_cores(Wp, grid, row_axis=0, col_axis=1)))
    got = np.concatenate([np.asarray(out)[0, c] for c in range(grid.cols)], axis=-1)
    want = np.asarray(rmsnorm_ref(jnp.asarray(x), jnp.asarray(w), 1e-5)) @ W
    # The norm's scale applied after the product instead of before: float32 rounding level.
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (np.asarray(out) == np.asarray(out)[:1]).all()  # every row holds the same result


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule))
def test_decode_attention_mesh_matches_reference(executor, schedule):
    grid = Grid(4, 2)  # positions dealt cyclically over 4 rows, KV heads over 2 columns
    cm = make_core_mesh(grid, executor)
    rng = np.random.default_rng(3)
    B, K, G, S, H = 3, 4, 2, 12, 8
    q = rng.standard_normal((B, K, G, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, H)).astype(np.float32)
    pos = np.array([0, 5, 11])  # position 0: only row 0 sees anything
    visible = np.arange(S)[None] <= pos[:, None]

    def by_core(a):  # [B, K, S, H] -> [R, C, B, K/C, S/R, H], position p on row p % R
        s = S // grid.rows
        a = a.reshape(B, K, s, grid.rows, H).transpose(3, 0, 1, 2, 4)  # [R, B, K, s, H]
        return np.stack([tile_to_cores(a[r], Grid(1, grid.cols), col_axis=1)[0] for r in range(grid.rows)])

    vis = visible.reshape(B, S // grid.rows, grid.rows).transpose(2, 0, 1)  # [R, B, s]
    vis = np.broadcast_to(vis[:, None], (grid.rows, grid.cols) + vis.shape[1:])
    out = jax.jit(cm.run(lambda qq, kk, vv, mm: decode_attention_mesh(qq, kk, vv, mm, ROW, schedule)))(
        cm.place(tile_to_cores(q, grid, col_axis=1)), cm.place(by_core(k)), cm.place(by_core(v)), cm.place(vis))
    got = np.concatenate([np.asarray(out)[0, c] for c in range(grid.cols)], axis=1)  # [B, K, G, H]
    want = np.asarray(gqa_attention_ref(jnp.asarray(q.reshape(B, 1, K * G, H)), jnp.asarray(k), jnp.asarray(v),
                                        jnp.asarray(visible[:, None])))[:, 0].reshape(B, K, G, H)
    # float32 softmax over 12 positions merged by log-sum-exp: a few ulps of O(1) values.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("schedule", list(Schedule), ids=lambda s: s.value)
def test_decode_attention_head_dim_split_matches_reference(executor, schedule):
    """Head dims over segments of 3 columns (2 segments, one KV head each, 2 query heads per KV
    head): partial scores summed within each segment, positions over 2 rows."""
    grid, seg = Grid(2, 6), 3
    cm = make_core_mesh(grid, executor)
    rng = np.random.default_rng(4)
    B, K, G, S, H = 2, 2, 2, 8, 6  # each column: h = H / seg = 2 dims of one KV head
    q = rng.standard_normal((B, K, G, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, H)).astype(np.float32)
    visible = np.arange(S)[None] <= np.array([3, 7])[:, None]
    h = H // seg
    def core(a, r, c, positions):  # core (r, c): KV head c // seg, dims (c % seg) * h ..; position p on row p % R
        piece = a[:, c // seg: c // seg + 1, ..., (c % seg) * h: (c % seg + 1) * h]
        return piece[:, :, r::grid.rows] if positions else piece

    tiles = lambda a, positions: np.stack([np.stack([core(a, r, c, positions) for c in range(grid.cols)])
                                           for r in range(grid.rows)])
    vis = np.stack([np.stack([visible[:, r::grid.rows]] * grid.cols) for r in range(grid.rows)])
    run = cm.run(lambda qq, kk, vv, mm: decode_attention_mesh(qq, kk, vv, mm, ROW, schedule, dim_axis=COL,
                                                               dim_segment=seg, head_dim=H))
    out = np.asarray(jax.jit(run)(cm.place(tiles(q, False)), cm.place(tiles(k, True)), cm.place(tiles(v, True)),
                                  cm.place(vis)))  # [R, C, B, 1, G, h]
    got = np.concatenate([np.concatenate([out[0, g * seg + j] for j in range(seg)], -1) for g in range(K)], 1)
    want = np.asarray(gqa_attention_ref(jnp.asarray(q.reshape(B, 1, K * G, H)), jnp.asarray(k), jnp.asarray(v),
                                        jnp.asarray(visible[:, None])))[:, 0].reshape(B, K, G, H)
    # float32 dots of 6 terms summed in 3 partials, softmax over 8 positions: a few ulps.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all((out[r] == out[0]).all() for r in range(grid.rows))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_argmax_mesh_first_occurrence(executor):
    grid = Grid(1, 4)
    cm = make_core_mesh(grid, executor)
    logits = np.full((3, 12), -1.0, np.float32)
    logits[0, 7] = 5.0  # a single maximum in shard 2
    logits[1, [2, 9]] = 4.0  # a tie across shards 0 and 3: the first index wins
    logits[2, [4, 5]] = 3.0  # a tie inside shard 1
    out = jax.jit(cm.run(lambda l: argmax_mesh(l, COL)))(cm.place(tile_to_cores(logits, grid, col_axis=1)))
    assert np.asarray(out)[0, 0].tolist() == [7, 2, 4] == np.argmax(logits, axis=-1).tolist()
    assert (np.asarray(out) == np.asarray(out)[0, 0]).all()


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (5, 1.0), (5, 0.5), (0, 0.9), (0, 1e-6)])
def test_sample_mesh_keeps_to_the_filtered_set(executor, top_k, top_p):
    """Sharded sampling draws only tokens `sample_ref`'s filters keep, the same on every core,
    and covers the kept set (so a filter that kept too little would fail too)."""
    from kernels.lm_head import sample_mesh

    grid = Grid(1, 4)
    cm = make_core_mesh(grid, executor)
    V = 38  # padded to 40 over 4 columns
    logits = np.random.default_rng(5).standard_normal((2, V)).astype(np.float32) * 2
    padded = np.pad(logits, ((0, 0), (0, 2)), constant_values=-np.inf)
    order = np.argsort(-logits, axis=-1)
    if top_k:
        allowed = [set(order[b, :top_k].tolist()) for b in range(2)]
    else:  # nucleus: smallest prefix of the sorted tokens whose mass reaches p
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        allowed = []
        for b in range(2):
            mass = np.cumsum(p[b, order[b]]) - p[b, order[b]]
            allowed.append(set(order[b, mass < top_p].tolist()) | {int(order[b, 0])})
    if top_k and top_p < 1:  # top-p inside the top k: recompute over the kept tokens
        allowed = []
        for b in range(2):
            kept = logits[b, order[b, :top_k]]
            q = np.exp(kept - kept.max())
            q /= q.sum()
            allowed.append(set(order[b, :top_k][(np.cumsum(q) - q) < top_p].tolist()))

    def core(l, seed):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(2))
        return sample_mesh(l, COL, V, keys, jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p), greedy=False)

    f = jax.jit(cm.run(core))
    seen = [set(), set()]
    placed = cm.place(tile_to_cores(padded, grid, col_axis=1))
    for seed in range(60):
        out = np.asarray(f(placed, cm.place(np.full((1, 4), seed, np.uint32))))
        assert (out == out[0, 0]).all()
        for b in range(2):
            seen[b].add(int(out[0, 0, b]))
    for b in range(2):
        assert seen[b] <= allowed[b]
        if len(allowed[b]) <= 5:
            assert seen[b] == allowed[b]
