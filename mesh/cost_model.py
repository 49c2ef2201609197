"""Wafer cost model: the time of a traced per-core program on a `WaferSpec`, PLMR style.

WaferLLM's PLMR model names what dominates a wafer: massive Parallelism (every core runs the
same program on its tiles, so one core's time is the grid's), non-uniform Latency (a message
pays per hop), constrained Memory (48 KiB per core: a layout must fit) and constrained Routing
(few routes per core; every routing stage a message passes through costs time). Here:

- local time of a kernel = max(FLOPs / core FLOP rate, bytes read / core SRAM bandwidth): a
  core streams its tiles from SRAM through its vector unit, so compute and reads overlap;
- fabric time of one all-reduce call (mesh/trace.py groups its messages) =
    sum over its dependent levels of (stage_cycles + longest route's hops · hop_cycles)
    + the most words any one directed link carries / link width.
  Messages are streamed (wavelets are forwarded as they arrive), so a message's length is paid
  once per link it loads, not once per stage;
- a kernel's time is local + fabric (a GEMV's reduction waits for its product).
- the additions of an all-reduce (FLOPs traced inside its scope) are part of its routing stages:
  a core adds a wavelet to its partial sum as it forwards it. They are not charged as compute
  (the program adds whole vectors on every core and masks, a form vmap needs, not a wafer).

Collectives without routes of their own (`psum`, `pmax`, `pmin`, `all_gather`: XLA picks the
algorithm) are priced as the vendor's pipeline reduction that WaferLLM compares against: a chain
from both ends of the axis toward its middle core and back, one hop per stage. A segmented one
(`Collective.segment`: each run of m cores reduces on its own) is that chain over one segment:
the segments run side by side on disjoint links, so the latency is the segment's, and the
messages are every segment's. Segmented ring and K-tree calls carry their real routes, which
already stay within their segments.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable

from mesh.axes import ALLREDUCE_SCOPE
from mesh.trace import Collective, CoreTrace
from mesh.wafer import WaferSpec

Route = tuple[int, int]


def chain_steps(n: int) -> list[list[Route]]:
    """Pipeline all-reduce over n cores: both ends reduce toward core n // 2, then broadcast back.

    Each step is a list of (source, destination) routes that travel at the same time.
    """
    mid = n // 2
    reduce = []
    for i in range(max(mid, n - 1 - mid)):
        step = []
        if i < mid:
            step.append((i, i + 1))
        if i < n - 1 - mid:
            step.append((n - 1 - i, n - 2 - i))
        reduce.append(step)
    broadcast = [[(d, s) for s, d in step] for step in reversed(reduce)]
    return reduce + broadcast


def gather_steps(n: int) -> list[list[Route]]:
    """All-gather along a line: every chunk travels both ways, one hop per step, n - 1 steps."""
    return [[(i, i + 1) for i in range(n - 1)] + [(i + 1, i) for i in range(n - 1)] for _ in range(n - 1)]


def collective_steps(c: Collective) -> list[list[Route]]:
    """The routes of one collective as steps of simultaneous messages along its axis (for a
    modeled segmented collective, those of its first segment: the others run alike beside it)."""
    if c.primitive == "ppermute":
        return [list(c.pairs)] if c.pairs else []
    if c.primitive == "all_gather":
        return gather_steps(c.line)
    return chain_steps(c.line)


@dataclasses.dataclass(frozen=True)
class CallCost:
    """One all-reduce call (or standalone collective) of the program, priced."""

    scope: str  # where the call's first collective was made
    axis: str
    axis_size: int
    primitive: str  # "ppermute" for the schedules written with messages, else the primitive
    nbytes: int  # bytes each core contributes to one message
    count: int
    stages: int  # dependent routing stages
    hops: int  # sum over stages of the longest route's hops (the latency path)
    max_link_words: int  # the most 32-bit words any one directed link carries
    messages: int  # messages sent over the fabric (all cores along one line of the axis)
    cycles: float
    segment: int | None = None  # a segmented all-reduce: cores per segment (None: the whole axis)


def price_calls(collectives: Iterable[Collective], spec: WaferSpec) -> list[CallCost]:
    by_call: dict[int, list[Collective]] = collections.defaultdict(list)
    for c in collectives:
        by_call[c.call].append(c)
    out = []
    for members in by_call.values():
        first = members[0]
        # Levels of a call run one after another; a modeled collective expands into its steps.
        levels: dict[int, list[list[Route]]] = collections.defaultdict(list)
        words: dict[int, float] = {}
        for c in members:
            steps = collective_steps(c)
            for k, step in enumerate(steps):
                levels[(c.level, k)].append(step)
            words[id(c)] = c.nbytes / spec.link_bytes_per_cycle
        link_words: dict[Route, float] = collections.Counter()
        messages = 0
        for c in members:
            copies = 1 if c.primitive == "ppermute" else c.segments
            for step in collective_steps(c):
                for s, d in step:
                    messages += copies
                    direction = 1 if d > s else -1
                    for i in range(s, d, direction):
                        link_words[(i, i + direction)] += words[id(c)]
        stages = hops = 0
        for key in sorted(levels):
            longest = max((abs(s - d) for step in levels[key] for s, d in step), default=0)
            if longest:
                stages += 1
                hops += longest
        max_link = max(link_words.values(), default=0.0)
        cycles = stages * spec.stage_cycles + hops * spec.hop_cycles + max_link
        out.append(CallCost(first.scope, first.axis, first.axis_size, first.primitive, first.nbytes, first.count,
                            stages, hops, round(max_link), messages, cycles * first.count, first.segment))
    return out


@dataclasses.dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a program run on one core (seconds)."""

    name: str
    flops: int
    read_bytes: int
    fabric_bytes: int  # bytes this core sends per run, summed over its calls
    calls: int
    compute_s: float
    memory_s: float
    fabric_s: float

    @property
    def local_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def time_s(self) -> float:
        return self.local_s + self.fabric_s


def kernel_times(trace: CoreTrace, spec: WaferSpec, group_of: Callable[[str], str]) -> dict[str, KernelTime]:
    """Price a trace per kernel; `group_of` maps a named scope to the kernel it belongs to."""
    flops: dict[str, int] = collections.Counter()
    reads: dict[str, int] = collections.Counter()
    for scope, f in trace.flops_by_scope.items():
        if ALLREDUCE_SCOPE not in scope.split("/"):
            flops[group_of(scope)] += f
    for scope, b in trace.read_bytes_by_scope.items():
        reads[group_of(scope)] += b
    fabric: dict[str, float] = collections.Counter()
    sent: dict[str, int] = collections.Counter()
    ncalls: dict[str, int] = collections.Counter()
    for call in price_calls(trace.collectives, spec):
        g = group_of(call.scope)
        fabric[g] += call.cycles / spec.clock_hz
        ncalls[g] += call.count
    for c in trace.collectives:
        span = c.axis_size if c.primitive == "ppermute" else c.line  # the cores the steps' routes cover
        sent[group_of(c.scope)] += c.nbytes * c.count * sum(len(s) for s in collective_steps(c)) // max(1, span)
    out = {}
    for g in sorted(set(flops) | set(reads) | set(fabric)):
        out[g] = KernelTime(g, flops[g], reads[g], sent[g], ncalls[g],
                            flops[g] / spec.core_flops_per_cycle / spec.clock_hz,
                            reads[g] / spec.core_bytes_per_cycle / spec.clock_hz, fabric[g])
    return out


def sent_bytes_per_position(c: Collective) -> dict[int, int]:
    """Bytes each core position along the collective's axis sends in one run of it."""
    out: dict[int, int] = collections.Counter()
    copies = [0] if c.primitive == "ppermute" else [g * c.line for g in range(c.segments)]
    for step in collective_steps(c):
        for s, _ in step:
            for base in copies:
                out[base + s] += c.nbytes * c.count
    return dict(out)
