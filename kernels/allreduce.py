"""All-reduce along one mesh axis, in the schedules worth comparing on a wafer.

- PSUM: XLA's own all-reduce.
- RING: neighbour-only messages around a ring: n-1 shifts by one core, each core collecting every
  partial sum, then every core adds them in core order (so all cores hold bit-identical sums).
- KTREE: WaferLLM's two-level tree: the axis is cut into `groups` contiguous groups; each group
  reduces toward its middle core with chains from both ends, the group roots reduce toward the
  middle root the same way, and the total is broadcast back down the same routes. Only a few
  distinct routes per core (the wafer has ~24 "colors"), and latency ~ n/groups + groups hops
  instead of n.

All schedules are per-core code (they call collectives with the axis name) and run unchanged
under every executor. The tree's message plan is static Python (`ktree_plan`), so the profiler
can count its hops without running anything.

SEGMENTED all-reduce (`segment=m`): the axis is cut into n // m contiguous segments of m cores and
each segment reduces on its own (a head's partial dot products over the columns that hold its
slices, model/wafer_layout.py); the n % m cores past the last segment keep their own values. PSUM
passes `axis_index_groups`; vmap (the vcores executor) has no grouped collectives, so there it
falls back to a masked psum of a [n // m, ...] buffer, each core writing its segment's row (same
sums, n // m times the bytes; the profiler traces the grouped form). RING shifts within each segment and
KTREE runs `ktree_plan(m)` in every segment at once, so both send only within a segment. Every
segmented call runs in a scope f"{SEGMENT_SCOPE_PREFIX}{m}", which the profiler reads as the
segment length (mesh/trace.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.schedules import ReduceOp, Schedule  # noqa: F401 (re-exported)
from mesh.axes import ALLREDUCE_SCOPE, ROUTES_SCOPE_PREFIX, SEGMENT_SCOPE_PREFIX


_COMBINE = {ReduceOp.SUM: jnp.add, ReduceOp.MAX: jnp.maximum}


def allreduce(x: jax.Array, axis: str, schedule: Schedule, groups: int | None = None,
              op: ReduceOp = ReduceOp.SUM, segment: int | None = None) -> jax.Array:
    """Sum (or max, with `op`) `x` over the cores along mesh axis `axis`; every core gets the result.

    With `segment=m` (m <= n), over each run of m contiguous cores instead: core j < m*(n // m)
    gets the reduction over cores m*(j // m) .. m*(j // m) + m - 1, a core past the last whole
    segment its own value. `groups` then counts K-tree groups per segment.

    Every call runs in a named scope `ALLREDUCE_SCOPE`: the profiler (mesh/trace.py) reads one
    call's collectives as one all-reduce.
    """
    n = jax.lax.axis_size(axis)
    m = n if segment is None else segment
    if not 1 <= m <= n:
        raise ValueError(f"segment {m} outside 1 .. {n}, the cores along {axis}")
    if m == 1:
        return x
    if m < n:
        with jax.named_scope(ALLREDUCE_SCOPE), jax.named_scope(f"{SEGMENT_SCOPE_PREFIX}{m}"):
            return _segmented(x, axis, n, m, schedule, groups, op)
    with jax.named_scope(ALLREDUCE_SCOPE):
        if schedule is Schedule.PSUM:
            return per_core(jax.lax.psum(x, axis) if op is ReduceOp.SUM else jax.lax.pmax(x, axis), axis)
        if schedule is Schedule.RING:
            return ring_allreduce(x, axis, n, op)
        if schedule is Schedule.KTREE:
            return ktree_allreduce(x, axis, n, groups, op)
    raise ValueError(f"unknown schedule {schedule}")


def per_core(y: jax.Array, axis: str) -> jax.Array:
    """`y`, a value every core along `axis` holds alike, as one each core holds itself.

    Exact (a select that always takes y) and nearly free under `shard_map`. Under `vmap` (the
    vcores executor) it keeps the next matmul from transposing its weight: vmap keeps a psum's
    result as one value shared by the whole axis, and a matmul of that shared value by a tile
    that differs per core makes JAX fold the axis into the tile's output dimension, which XLA on
    CPU ran by transposing the whole weight every step (docs/mesh/PROFILE.md).
    """
    return jnp.where(jax.lax.axis_index(axis) >= 0, y, jnp.zeros((), y.dtype))


def segment_groups(n: int, m: int) -> list[list[int]]:
    """The n // m segments of m contiguous cores along an axis of n, then each core past the last
    segment as a group of its own."""
    whole = m * (n // m)
    return [list(range(g, g + m)) for g in range(0, whole, m)] + [[j] for j in range(whole, n)]


def _segmented(x: jax.Array, axis: str, n: int, m: int, schedule: Schedule, groups: int | None, op: ReduceOp):
    k, whole = n // m, m * (n // m)
    if schedule is Schedule.PSUM:
        prim = jax.lax.psum if op is ReduceOp.SUM else jax.lax.pmax
        try:
            return prim(x, axis, axis_index_groups=segment_groups(n, m))
        except NotImplementedError:
            # vmap refuses axis_index_groups when it binds the axis (the vcores executor); the
            # trace executor and shard_map take them. The choice is made once, at trace time.
            j = jax.lax.axis_index(axis)
            seg = j // m
            fill = 0.0 if op is ReduceOp.SUM else -jnp.inf
            rows = jnp.where((jnp.arange(k) == seg).reshape((k,) + (1,) * x.ndim), x[None], fill)
            y = jnp.take(prim(rows, axis), jnp.minimum(seg, k - 1), axis=0)
            return jnp.where(j < whole, y, x)
    if schedule is Schedule.RING:
        y = ring_allreduce(x, axis, n, op, m)
    elif schedule is Schedule.KTREE:
        y = ktree_allreduce(x, axis, n, groups, op, m)
    else:
        raise ValueError(f"unknown schedule {schedule}")
    return y if whole == n else jnp.where(jax.lax.axis_index(axis) < whole, y, x)


def allreduce_ref(x_nX: np.ndarray, segment: int | None = None, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
    """The plain reference: x [n, ...] (core j's operand in row j) -> what every core gets, [n, ...]."""
    n = x_nX.shape[0]
    m = n if segment is None else segment
    out = x_nX.copy()
    for g in segment_groups(n, m):
        out[g] = x_nX[g].sum(axis=0) if op is ReduceOp.SUM else x_nX[g].max(axis=0)
    return out


def ring_allreduce(x: jax.Array, axis: str, n: int, op: ReduceOp = ReduceOp.SUM,
                   segment: int | None = None) -> jax.Array:
    m = n if segment is None else segment
    whole = m * (n // m)  # cores past the last whole segment send to themselves (the caller masks them)
    shift = [(g + j, g + (j + 1) % m) for g in range(0, whole, m) for j in range(m)]
    shift += [(j, j) for j in range(whole, n)]
    received = [x]  # received[i] on core j is the partial sum of core (j - i) mod m of its segment
    for _ in range(m - 1):
        received.append(jax.lax.ppermute(received[-1], axis, shift))
    stacked = jnp.stack(received)
    j = jax.lax.axis_index(axis) % m
    in_core_order = jnp.take(stacked, (j - jnp.arange(m)) % m, axis=0)
    return jnp.sum(in_core_order, axis=0) if op is ReduceOp.SUM else jnp.max(in_core_order, axis=0)


@dataclasses.dataclass(frozen=True)
class KTreePlan:
    """Static message plan of a K-tree all-reduce over n cores.

    `reduce_steps` and `broadcast_steps` are lists of steps; a step is a list of ppermute batches
    (each a list of (source, destination) pairs with distinct sources and destinations) that
    travel at the same time. `root` is the core that ends up holding the total.
    """

    n: int
    groups: int
    reduce_steps: list
    broadcast_steps: list
    root: int


def default_groups(n: int) -> int:
    """~sqrt(n) groups balances the two tree levels (n/groups vs groups hops)."""
    return max(1, round(n ** 0.5))


def _chain_toward(members: list[int], target: int):
    """Steps that reduce along `members` (ordered) toward `target`: (rightward, leftward) pairs."""
    t = members.index(target)
    left, right = members[: t + 1], members[t:][::-1]
    steps = []
    for i in range(max(len(left), len(right)) - 1):
        rightward = [(left[i], left[i + 1])] if i + 1 < len(left) else []
        leftward = [(right[i], right[i + 1])] if i + 1 < len(right) else []
        steps.append((rightward, leftward))
    return steps


def ktree_plan(n: int, groups: int | None = None) -> KTreePlan:
    groups = min(n, groups or default_groups(n))
    bounds = [round(g * n / groups) for g in range(groups + 1)]
    members = [list(range(bounds[g], bounds[g + 1])) for g in range(groups)]
    roots = [m[len(m) // 2] for m in members]
    top = roots[len(roots) // 2]

    def merge(per_chain_steps):
        """Run independent chains side by side: step i of every chain travels together."""
        depth = max((len(s) for s in per_chain_steps), default=0)
        out = []
        for i in range(depth):
            batches = [[], []]
            for steps in per_chain_steps:
                if i < len(steps):
                    batches[0] += steps[i][0]
                    batches[1] += steps[i][1]
            out.append([b for b in batches if b])
        return out

    level1 = merge([_chain_toward(m, r) for m, r in zip(members, roots)])
    level2 = merge([_chain_toward(roots, top)])
    reduce_steps = level1 + level2
    # Broadcast retraces the reduction routes backwards: every message reversed, steps reversed.
    broadcast_steps = [[[(d, s) for s, d in batch] for batch in step] for step in reversed(reduce_steps)]
    return KTreePlan(n, groups, reduce_steps, broadcast_steps, top)


def partial_ppermute(x: jax.Array, axis: str, pairs: list[tuple[int, int]], n: int):
    """`ppermute` of only `pairs`; returns (received, is_destination) on every core.

    vmap's ppermute accepts only full permutations, so the pairs are completed with filler
    routes (idle sources to idle destinations) whose data the receivers ignore.
    """
    sources = {s for s, _ in pairs}
    dests = {d for _, d in pairs}
    filler = zip([s for s in range(n) if s not in sources], [d for d in range(n) if d not in dests])
    with jax.named_scope(f"{ROUTES_SCOPE_PREFIX}{len(pairs)}"):
        received = jax.lax.ppermute(x, axis, list(pairs) + list(filler))
    is_dest = jnp.isin(jax.lax.axis_index(axis), jnp.asarray(sorted(dests)))
    return received, is_dest


def ktree_allreduce(x: jax.Array, axis: str, n: int, groups: int | None = None,
                    op: ReduceOp = ReduceOp.SUM, segment: int | None = None) -> jax.Array:
    m = n if segment is None else segment
    plan = ktree_plan(m, groups)
    # Every segment runs the same plan at the same time: one ppermute carries all their routes.
    shifted = lambda batch: [(g + s, g + d) for g in range(0, m * (n // m), m) for s, d in batch]
    combine = _COMBINE[op]
    acc = x
    for step in plan.reduce_steps:
        for batch in step:
            received, is_dest = partial_ppermute(acc, axis, shifted(batch), n)
            acc = jnp.where(is_dest, combine(acc, received), acc)
    for step in plan.broadcast_steps:
        for batch in step:
            received, is_dest = partial_ppermute(acc, axis, shifted(batch), n)
            acc = jnp.where(is_dest, received, acc)
    return acc
