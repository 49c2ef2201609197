"""The trace executor's reading of a per-core program: bytes, FLOPs and every message.

`trace_program` traces the program of one core with `jax.make_jaxpr` (the mesh axes bound by
`axis_env`, operands abstract at real tile sizes, nothing allocated or run) and walks the jaxpr,
sub-jaxprs included (jit, custom_jvp/vjp, scan, cond, while), collecting:

- the bytes of the core's operands, by the kind the caller gives each (weights, KV cache, ...);
- FLOPs per named scope: 2·M·N·K per `dot_general`, one per output element of elementwise
  arithmetic, one per input element of reductions;
- every collective: primitive, axis, axis length, bytes per core, the segment length of a
  segmented all-reduce (kernels/allreduce.py: psum's `axis_index_groups`, or the scope
  f"{SEGMENT_SCOPE_PREFIX}{m}" its messages run in), and for `ppermute` the real routes
  (source, destination) along the axis, from which hop counts follow. Filler routes that
  only complete a permutation for `vmap` (kernels/allreduce.py `partial_ppermute`) are dropped:
  the kernel names their count in its scope.

Collectives made inside one `allreduce` call (kernels/allreduce.py names its scope) form one
*call*; a standalone collective is a call of its own. Within a call each collective gets a
*level*: one more than the deepest collective of the same call it depends on through the
dataflow, so messages of one level travel at the same time (a K-tree step's rightward and
leftward chains). The cost model (mesh/cost_model.py) prices calls from these records.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.extend import core as jcore

from mesh.axes import ALLREDUCE_SCOPE, COL, ROUTES_SCOPE_PREFIX, ROW, SEGMENT_SCOPE_PREFIX
from mesh.executors import Executor, Grid, make_core_mesh

COLLECTIVES = frozenset({"psum", "pmax", "pmin", "ppermute", "all_gather", "all_to_all", "reduce_scatter",
                         "psum_scatter"})
ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "rsqrt",
                         "sqrt", "logistic", "tanh", "pow", "integer_pow", "abs", "sin", "cos", "square",
                         "erf", "add_any"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin", "cumsum", "cumlogsumexp",
                        "cummax", "reduce_prod"})


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the per-core program, as every core along its axis performs it."""

    primitive: str  # psum | pmax | pmin | ppermute | all_gather | ...
    axis: str
    axis_size: int  # n: cores along the axis
    nbytes: int  # bytes each core contributes (its operands)
    scope: str  # the named scope it was called in, e.g. "layer0/attention/mesh_gemv/allreduce"
    call: int  # the all-reduce call it belongs to (a standalone collective is a call of its own)
    level: int  # 1 + the deepest collective of the same call it waits for
    pairs: tuple[tuple[int, int], ...] = ()  # ppermute: real routes (source, destination) along the axis
    count: int = 1  # times it runs per program run (a scan body's length)
    segment: int | None = None  # segmented: runs of this many cores reduce on their own (None: the whole axis)

    @property
    def line(self) -> int:
        """Cores one instance of the collective spans: the segment, or the whole axis."""
        return self.segment or self.axis_size

    @property
    def segments(self) -> int:
        """Instances side by side along the axis (whole segments; 1 when not segmented)."""
        return self.axis_size // self.line

    @property
    def hops(self) -> tuple[int, ...]:
        """Manhattan distance of each route (cores lie on a line along one mesh axis)."""
        return tuple(abs(s - d) for s, d in self.pairs)


@dataclasses.dataclass(frozen=True)
class CoreTrace:
    """What one core holds, computes and sends in one run of its program."""

    grid: Grid
    bytes_by_kind: dict[str, int]  # operand bytes per kind
    flops_by_scope: dict[str, int]
    read_bytes_by_scope: dict[str, int]  # operand bytes, charged to the scope that first reads them
    collectives: tuple[Collective, ...]
    jaxpr_eqns: int  # equations walked, sub-jaxprs included

    @property
    def flops(self) -> int:
        return sum(self.flops_by_scope.values())

    def collective_bytes(self) -> dict[str, int]:
        """Bytes per core per primitive, summed over every collective."""
        out: dict[str, int] = collections.Counter()
        for c in self.collectives:
            out[c.primitive] += c.nbytes * c.count
        return dict(out)

    def collective_counts(self) -> dict[str, int]:
        out: dict[str, int] = collections.Counter()
        for c in self.collectives:
            out[c.primitive] += c.count
        return dict(out)


def _aval_bytes(aval) -> int:
    return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


class _Walk:
    def __init__(self, axis_sizes: dict[str, int]):
        self.axis_sizes = axis_sizes
        self.flops: dict[str, int] = collections.Counter()
        self.collectives: list[Collective] = []
        self.calls = 0
        self.in_allreduce = False
        self.eqns = 0
        self.reads: dict[str, int] = collections.Counter()
        self.unread: dict = {}  # program operands not read yet -> bytes

    def new_call(self) -> int:
        self.calls += 1
        return self.calls

    def walk(self, jaxpr, scope: str, count: int, in_info: list):
        """Walk `jaxpr`; `in_info` gives each invar's (call, level) or None. Returns the outvars'."""
        info = {v: i for v, i in zip(jaxpr.invars, in_info) if i is not None}

        def get(v):
            return None if isinstance(v, jcore.Literal) else info.get(v)

        for eqn in jaxpr.eqns:
            self.eqns += 1
            stack = str(eqn.source_info.name_stack)
            eqn_scope = "/".join(s for s in (scope, stack) if s)
            frames = eqn_scope.split("/")
            in_allreduce = ALLREDUCE_SCOPE in frames
            if in_allreduce and not self.in_allreduce:
                self.allreduce_call = self.new_call()
            self.in_allreduce = in_allreduce
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal) and v in self.unread:
                    self.reads[eqn_scope] += self.unread.pop(v)
            ins = [get(v) for v in eqn.invars]
            latest = max((i for i in ins if i is not None), default=None)
            name = eqn.primitive.name
            if name in COLLECTIVES:
                out = self._collective(eqn, eqn_scope, frames, count, ins, in_allreduce)
                outs = [out] * len(eqn.outvars)
            elif self._sub_jaxprs(eqn):
                outs = self._descend(eqn, eqn_scope, count, ins)
            else:
                self.flops[eqn_scope] += count * _flops(eqn)
                outs = [latest] * len(eqn.outvars)
            for v, o in zip(eqn.outvars, outs):
                if o is not None:
                    info[v] = o
        return [get(v) for v in jaxpr.outvars]

    def _collective(self, eqn, scope, frames, count, ins, in_allreduce):
        call = self.allreduce_call if in_allreduce else self.new_call()
        level = 1 + max((lvl for c, lvl in (i for i in ins if i is not None) if c == call), default=0)
        p = eqn.params
        axes = p.get("axis_name", p.get("axes"))
        axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
        n = math.prod(self.axis_sizes[a] for a in axes)
        pairs = ()
        if eqn.primitive.name == "ppermute":
            pairs = tuple((int(s), int(d)) for s, d in p["perm"] if s != d)
            routes = [f for f in frames if f.startswith(ROUTES_SCOPE_PREFIX)]
            if routes:  # only the first k pairs are real routes; the rest fill the permutation
                pairs = tuple((int(s), int(d)) for s, d in p["perm"][: int(routes[-1][len(ROUTES_SCOPE_PREFIX):])])
        nbytes = sum(_aval_bytes(v.aval) for v in eqn.invars)
        segment = None
        groups = p.get("axis_index_groups")
        segs = [f for f in frames if f.startswith(SEGMENT_SCOPE_PREFIX)]
        if groups:
            segment = max(len(g) for g in groups)
        elif segs:
            segment = int(segs[-1][len(SEGMENT_SCOPE_PREFIX):])
        self.collectives.append(Collective(eqn.primitive.name, ",".join(axes), n, nbytes, scope, call, level,
                                           pairs, count, segment if segment != n else None))
        return call, level

    @staticmethod
    def _sub_jaxprs(eqn) -> list:
        subs = []
        for key, value in eqn.params.items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    subs.append((key, v))
        return subs

    def _descend(self, eqn, scope, count, ins):
        name, subs = eqn.primitive.name, self._sub_jaxprs(eqn)

        def jaxpr_of(j):
            return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j

        if name == "cond":
            # One branch runs: count the one with the most FLOPs (walked on copies, merged once).
            best = None
            for _, branch in subs:
                trial = _Walk(self.axis_sizes)
                trial.calls, trial.in_allreduce = self.calls, self.in_allreduce
                trial.allreduce_call = getattr(self, "allreduce_call", 0)
                out = trial.walk(jaxpr_of(branch), scope, count, ins[1:])
                if best is None or sum(trial.flops.values()) > sum(best[0].flops.values()):
                    best = (trial, out)
            trial, out = best
            for k, v in trial.flops.items():
                self.flops[k] += v
            self.collectives += trial.collectives
            self.calls, self.eqns = trial.calls, self.eqns + trial.eqns
            return out + [None] * (len(eqn.outvars) - len(out))
        if name == "scan":
            return self.walk(jaxpr_of(eqn.params["jaxpr"]), scope, count * eqn.params["length"], ins)
        if name == "while":
            # Trip count unknown statically: counted once.
            body = jaxpr_of(eqn.params["body_jaxpr"])
            self.walk(body, scope, count, [None] * len(body.invars))
            return [None] * len(eqn.outvars)
        # jit, pjit, custom_jvp_call, custom_vjp_call, remat, ...: operands map one to one.
        j = jaxpr_of(subs[0][1])
        return self.walk(j, scope, count, ins[-len(j.invars):] if j.invars else [])


def _flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
        return 2 * k * math.prod(eqn.outvars[0].aval.shape)
    if name in ELEMENTWISE:
        return math.prod(eqn.outvars[0].aval.shape)
    if name in REDUCTIONS:
        return math.prod(eqn.invars[0].aval.shape)
    return 0


def trace_program(program: Callable, grid: Grid, args: tuple, kinds: tuple) -> CoreTrace:
    """Trace `program(*args)` as the program of one core of `grid` and account it.

    Args:
      program: a per-core program (sees local tiles, calls collectives along ROW and COL).
      grid: the R×C grid whose axes the collectives name.
      args: the operands of one core: arrays or `jax.ShapeDtypeStruct`s of the local shapes.
      kinds: the same pytree as `args`, each leaf the kind its operand's bytes are counted under
        (e.g. "weight", "kv", "input").
    """
    closed = make_core_mesh(grid, Executor.TRACE).run(program)(*args)
    leaves, structure = jax.tree_util.tree_flatten(args)
    kind_leaves = structure.flatten_up_to(kinds)
    by_kind: dict[str, int] = collections.Counter()
    for kind, leaf in zip(kind_leaves, leaves):
        by_kind[kind] += _aval_bytes(leaf)
    w = _Walk({ROW: grid.rows, COL: grid.cols})
    w.unread = {v: _aval_bytes(v.aval) for v in closed.jaxpr.invars}
    w.walk(closed.jaxpr, "", 1, [None] * len(closed.jaxpr.invars))
    return CoreTrace(grid, dict(by_kind), dict(w.flops), dict(w.reads), tuple(w.collectives), w.eqns)
