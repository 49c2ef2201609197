"""Does disaggregation onto wafers pay? (issue 14): prefill on dense accelerators and decode on
wafers, against an integrated fleet of the same accelerators, at equal power footprint.

Method. Each side is simulated as one *unit* and scaled to the footprint:

- integrated: one replica of `g` accelerators (tensor-parallel group; `g` a power of two from the
  smallest group that holds the weights and 8 caches up to `max_group`, the best per kW kept);
- disaggregated: one wafer decode replica (wafers and slots from the profiler's staging plan) with
  `n` prefill accelerators (`n` around the count that balances prefill and decode, from the cost
  models, the best per kW kept).

A unit's goodput capacity is the highest Poisson arrival rate at which 90% of requests meet both
SLOs (TTFT, and TPOT = 1 / the fast per-user speed, so "good" and "fast" are the same bar; bracketing
and bisection, `bench.fleet.capacity`); its fast-token capacity is the fast tokens per second of
that run. A footprint of P kW holds floor(P / unit kW) units (`units_in`), and the fleet's figures
are the unit's times its units (a wafer replica is ~330 kW, so a footprint leaves part of itself
unused: the ratio per kW of the units themselves is reported beside it): capacity taken as linear in the units, which a least-loaded router
over many units only improves, and more so for the side with more, smaller units (the integrated
one), so the ratio errs towards the wafers by that much.

Power per unit is system power: a CS-3 at `CS3_KW` and an accelerator's share of its vendor system
(`Accelerator.system_watts`, e.g. a DGX H100's 10.2 kW / 8). Neither side counts the network, the
storage or the hosts that feed a CS-3 (MemoryX/SwarmX): an assumption the sensitivity table varies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from bench.fleet import CS3_KW, FleetPlan, capacity, disaggregated, integrated
from mesh.errors import WaferError
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from serve.costs import (Accelerator, DensePrefillCost, RooflineDecodeCost, accelerator, group_size, integrated_slots,
                         link, wafer_decode, weight_bytes)
from serve.simulator import SLO
from serve.workload import PROFILES, LengthDist, Workload, synthetic

MIXES = ("chat", "code", "agentic")
ATTAINMENT = 0.9
SPAN_TTFTS = 5
BISECTIONS = 3  # capacity to within 1/8 of its bracket (a doubling): about +-6%


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the answer rests on; the sensitivity table moves these one at a time."""

    mfu: float = 0.5  # prefill (and integrated compute) model-FLOPs utilisation
    bw_efficiency: float = 0.8  # integrated decode: share of HBM bandwidth reached
    link: str = "efa3"  # KV link generation
    fast_speed: float = 100.0  # tokens/s per user that count as fast; TPOT SLO = 1 / this
    ttft_s: float = 2.0
    context: int = 4096  # KV positions reserved per slot, both sides
    grid: str = "360x360"  # wafer decode stage grid
    wafer_kw: float = CS3_KW
    accelerator_kw: float | None = None  # None: the preset's system share
    chunked: bool = False  # integrated: chunked prefill
    max_group: int = 8  # largest integrated tensor-parallel group tried (one 8-GPU node)

    def slo(self) -> SLO:
        return SLO(self.ttft_s, 1.0 / self.fast_speed, self.fast_speed)

    def chip_kw(self, chip: Accelerator) -> float:
        if self.accelerator_kw is not None:
            return self.accelerator_kw
        if chip.system_watts is None:
            raise WaferError(f"{chip.name} has no system power in its preset: a power footprint needs one")
        return chip.system_watts / 1e3

    def sim_key(self, mode: str = "") -> tuple:
        """The fields a unit's simulation depends on, for a side (`mode`) or both ("") (power
        figures only scale units; the group bound only chooses among integrated units)."""
        fields = {"integrated": ("link", "grid"), "disaggregated": ("bw_efficiency", "chunked")}.get(mode, ())
        return tuple(v for k, v in dataclasses.asdict(self).items()
                     if k not in ("wafer_kw", "accelerator_kw", "max_group") + fields)


def units_in(power_kw: float, unit_kw: float) -> int:
    """Whole units of `unit_kw` within `power_kw` (a footprint never rounds up)."""
    if not unit_kw > 0:
        raise WaferError(f"a unit needs positive power, got {unit_kw} kW")
    return int(math.floor(power_kw / unit_kw * (1 + 1e-12)))


def disaggregated_unit_kw(wafers: int, prefill_chips: int, wafer_kw: float, chip_kw: float) -> float:
    return wafers * wafer_kw + prefill_chips * chip_kw


def mix_workload(mix: str, requests: int, rate: float, seed: int = 0) -> Workload:
    """The mix's Poisson arrivals, lengths uniform on [mean/2, 3 mean/2] (serve/workload.py PROFILES)."""
    p = PROFILES[mix]
    return synthetic(requests, rate, p.input_len, p.output_len, seed, 1.0, LengthDist.UNIFORM, name=mix)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One simulated unit of a side, with what the footprint arithmetic needs."""

    mode: str
    size: int  # integrated: accelerators in the group; disaggregated: prefill accelerators
    wafers: int  # 0 for integrated
    plan: FleetPlan
    estimate_req_s: float  # cost-model estimate of its capacity: where the search starts
    tpot_floor_s: float  # a lone request's step time: no TPOT SLO below it can be met


def _prefill_one_s(config: ModelConfig, chip: Accelerator, count: float, prompt: int, mfu: float) -> float:
    return DensePrefillCost(config, chip, count, mfu).prefill_s([prompt])


def integrated_unit(config: ModelConfig, chip: Accelerator, group: int, mix: str, a: Assumptions) -> Unit:
    p = PROFILES[mix]
    plan = integrated(config, chip, group, a.context, a.chunked, a.mfu, a.bw_efficiency, group=group)
    slots = integrated_slots(config, chip, group, a.context)
    decode = RooflineDecodeCost(config, chip, group, a.mfu, a.bw_efficiency)
    ctx = p.input_len + p.output_len // 2
    batch = slots  # the largest batch whose step meets the TPOT SLO
    while batch > 1 and decode.decode_step_s(batch, batch * ctx) > 1.0 / a.fast_speed:
        batch -= 1
    per_request = p.output_len * decode.decode_step_s(batch, batch * ctx) / batch \
        + _prefill_one_s(config, chip, group, p.input_len, a.mfu)
    return Unit("integrated", group, 0, plan, 1.0 / per_request, decode.decode_step_s(1, p.input_len))


def balanced_prefill(config: ModelConfig, chip: Accelerator, spec: WaferSpec, mix: str, a: Assumptions) -> int:
    """Prefill accelerators per decode replica whose prompt rate matches the replica's request rate
    at full batch (cost models only), at least enough to hold the weights."""
    p = PROFILES[mix]
    d = wafer_decode(config, spec, a.grid, a.context)
    decode_rate = d.slots / (p.output_len * d.step_slots_s)
    need = decode_rate * _prefill_one_s(config, chip, 1, p.input_len, a.mfu)
    return max(min_prefill(config, chip), math.ceil(need))


def min_prefill(config: ModelConfig, chip: Accelerator) -> int:
    return math.ceil(weight_bytes(config) / (0.9 * chip.memory_bytes))


def disaggregated_unit(config: ModelConfig, chip: Accelerator, spec: WaferSpec, chips: int, mix: str,
                       a: Assumptions) -> Unit:
    p = PROFILES[mix]
    d = wafer_decode(config, spec, a.grid, a.context)
    plan = disaggregated(config, chip, chips, spec, a.grid, d.wafers, link(a.link), a.context, mfu=a.mfu)
    est = min(d.slots / (p.output_len * d.step_slots_s), chips / _prefill_one_s(config, chip, 1, p.input_len, a.mfu))
    return Unit("disaggregated", chips, d.wafers, plan, est, d.step_1_s)


def unit_capacity(unit: Unit, mix: str, requests: int, a: Assumptions, seed: int = 0) -> dict:
    """The unit's goodput capacity (req/s) and fast tokens/s at that rate; 0 without simulating when
    a lone request's step time already misses the TPOT SLO."""
    slo = a.slo()
    if unit.tpot_floor_s > slo.tpot_s:
        return {"capacity_req_s": 0.0, "fast_tokens_s": 0.0, "simulated": False,
                "note": f"step time {unit.tpot_floor_s * 1e3:.2f} ms > TPOT SLO {slo.tpot_s * 1e3:.2f} ms"}
    cap, s = capacity(unit.plan, lambda r: mix_workload(mix, requests, r, seed), slo, unit.estimate_req_s,
                      ATTAINMENT, BISECTIONS, max_rate(requests, a))
    return {"capacity_req_s": cap, "fast_tokens_s": s["fast_tokens_s"] if cap > 0 else 0.0, "simulated": True,
            "capped": bool(s.get("capped", False)), "ttft_p90_s": s["ttft_s"]["p90"], "tpot_p90_s": s["tpot_s"]["p90"],
            "slo_attainment": s["slo_attainment"]}


def max_rate(requests: int, a: Assumptions) -> float:
    """The highest rate a capacity search tries: arrivals spanning `SPAN_TTFTS` TTFT SLOs, so that a
    backlog shows in TTFT before the workload ends (a shorter burst drains within the SLO)."""
    return requests / (SPAN_TTFTS * a.ttft_s)


def _ratio(x: float, y: float) -> float | None:
    """x / y; None when y is 0 (the integrated fleet serves nothing at this bar)."""
    return x / y if y > 0 else None


class _Runner:
    """Unit capacities, computed once per (unit, mix, simulation-relevant assumptions)."""

    def __init__(self, config: ModelConfig, spec: WaferSpec, requests: dict[str, int], seed: int,
                 progress: Callable[[str], None] | None):
        self.config, self.spec, self.requests, self.seed, self.progress = config, spec, requests, seed, progress
        self.cache: dict[tuple, dict] = {}

    def run(self, unit: Unit, chip: Accelerator, mix: str, a: Assumptions) -> dict:
        key = (unit.mode, unit.size, chip.name, mix, a.sim_key(unit.mode))
        if key not in self.cache:
            self.cache[key] = unit_capacity(unit, mix, self.requests[mix], a, self.seed)
        if self.progress:
            self.progress(f"{chip.name} {mix} {unit.mode} {unit.size}")
        return self.cache[key]

    def best(self, chip: Accelerator, mix: str, a: Assumptions, power_kw: float, prefill_options: str = "around") -> dict:
        """Both sides' best unit per kW at `a`, sized to `power_kw`, and the ratios."""
        chip_kw = a.chip_kw(chip)
        sides = {}
        cands = []
        for g in integrated_groups(self.config, chip, a):
            u = integrated_unit(self.config, chip, g, mix, a)
            cands.append((u, g * chip_kw))
        sides["integrated"] = self._pick(cands, chip, mix, a, power_kw)
        n = balanced_prefill(self.config, chip, self.spec, mix, a)
        ns = sorted({max(min_prefill(self.config, chip), n // 2), n, 2 * n}) if prefill_options == "around" else [n]
        cands = []
        for k in ns:
            u = disaggregated_unit(self.config, chip, self.spec, k, mix, a)
            cands.append((u, disaggregated_unit_kw(u.wafers, k, a.wafer_kw, chip_kw)))
        sides["disaggregated"] = self._pick(cands, chip, mix, a, power_kw)
        d, i = sides["disaggregated"], sides["integrated"]
        return {"accelerator": chip.name, "mix": mix, "power_kw": power_kw, **sides,
                "goodput_ratio": _ratio(d["goodput_req_s"], i["goodput_req_s"]),
                "fast_tokens_ratio": _ratio(d["fast_tokens_s"], i["fast_tokens_s"]),
                "goodput_ratio_per_kw": _ratio(d["per_mw"]["goodput_req_s"], i["per_mw"]["goodput_req_s"]),
                "capped": bool(d["sim"].get("capped") or i["sim"].get("capped"))}

    def _pick(self, cands: list[tuple[Unit, float]], chip: Accelerator, mix: str, a: Assumptions,
              power_kw: float) -> dict:
        rows = []
        for u, kw in cands:
            r = self.run(u, chip, mix, a)
            n = units_in(power_kw, kw)
            row = {"unit": _describe(u, chip), "unit_kw": kw, "units": n, "fleet_kw": n * kw,
                   "unit_capacity_req_s": r["capacity_req_s"], "goodput_req_s": n * r["capacity_req_s"],
                   "fast_tokens_s": n * r["fast_tokens_s"],
                   "per_mw": {"goodput_req_s": r["capacity_req_s"] / kw * 1e3,
                              "fast_tokens_s": r["fast_tokens_s"] / kw * 1e3}, "sim": r}
            rows.append(row)
        best = max(rows, key=lambda row: (row["per_mw"]["goodput_req_s"], row["per_mw"]["fast_tokens_s"]))
        return dict(best, tried=[row["unit"] for row in rows])


def _describe(u: Unit, chip: Accelerator) -> str:
    if u.mode == "integrated":
        return f"{u.size} x {chip.name}"
    return f"{u.size} x {chip.name} + {u.wafers} x wafer"


def integrated_groups(config: ModelConfig, chip: Accelerator, a: Assumptions) -> list[int]:
    """The integrated group sizes tried: powers of two from the smallest that fits to `max_group`."""
    low = group_size(config, chip, a.context)
    return [g for g in (low * 2 ** i for i in range(12)) if g <= max(low, a.max_group)]


def question_jobs(config: ModelConfig, accelerators: list[str], mixes: list[str], a: Assumptions) -> int:
    """Unit searches of `question` (for a progress bar): each integrated group, three prefill counts."""
    return len(mixes) * sum(len(integrated_groups(config, accelerator(c), a)) + 3 for c in accelerators)


def question(config: ModelConfig, spec: WaferSpec, accelerators: list[str], mixes: list[str], power_kw: float,
             a: Assumptions = Assumptions(), requests: dict[str, int] | None = None, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> dict:
    """The answer table: per accelerator and mix, the best disaggregated and integrated fleets of
    `power_kw`, their goodput and fast-token capacity, and the ratios disaggregated / integrated."""
    chips = [accelerator(name) for name in accelerators]
    for m in mixes:
        if m not in MIXES:
            raise WaferError(f"unknown mix {m!r}; known: {', '.join(MIXES)}")
    for c in chips:
        a.chip_kw(c)
    runner = _Runner(config, spec, requests or default_requests(1000), seed, progress)
    rows = [runner.best(c, m, a, power_kw) for c in chips for m in mixes]
    return {"question": "disaggregated (dense prefill + wafer decode) vs integrated, equal power",
            "model": config.name, "wafer": spec.name, "footprint": footprint_note(chips, a), "power_kw": power_kw,
            "assumptions": dataclasses.asdict(a), "requests": runner.requests, "attainment": ATTAINMENT,
            "rows": rows, "five_x": five_x(rows)}


def default_requests(n: int) -> dict[str, int]:
    """Requests per simulation: `n` for chat, 3n for code (short outputs: cheap, and a fleet's
    capacity in req/s is high), half for agentic (15x the tokens of chat)."""
    return {"chat": n, "code": 3 * n, "agentic": max(1, n // 2)}


def footprint_note(chips: list[Accelerator], a: Assumptions) -> dict:
    out = {"unit": "kW of system power",
           "wafer": f"{a.wafer_kw:g} kW per CS-3" + (" (Cerebras CS-3 system power, datasheet)"
                                                      if a.wafer_kw == CS3_KW else " (assumption)")}
    for c in chips:
        out[c.name] = (f"{a.chip_kw(c):g} kW per accelerator ("
                       + (c.system_source if a.accelerator_kw is None else "assumption") + ")")
    return out


def five_x(rows: list[dict], claim: float = 5.0) -> list[dict]:
    """Per row, whether disaggregated reaches `claim` x integrated in each figure (None: integrated 0)."""
    out = []
    for r in rows:
        g, f = r["goodput_ratio"], r["fast_tokens_ratio"]
        out.append({"accelerator": r["accelerator"], "mix": r["mix"],
                    "goodput": None if g is None else g >= claim, "fast_tokens": None if f is None else f >= claim})
    return out


UNBOUNDED_SWING = 99.0  # a move that makes one side serve nothing (JSON has no infinity)

# The sensitivity table: one assumption at a time.
SENSITIVITY: tuple[tuple[str, str, tuple], ...] = (
    ("prefill MFU (0.5)", "mfu", (0.3, 0.7)),
    ("KV link (EFA v3, 3.2 Tb/s)", "link", ("efa1",)),
    ("fast speed, tok/s per user (100; TPOT SLO = 1/speed)", "fast_speed", (20.0, 50.0, 200.0, 500.0)),
    ("context reserved per slot (4096)", "context", (2048, 8192)),
    ("wafer power, kW per CS-3 (23)", "wafer_kw", (16.1, 29.9)),
    ("accelerator power (DGX share)", "accelerator_kw", ("board",)),
    ("wafer decode grid (360x360)", "grid", ("420x420", "377x1170")),  # 377x1170: the vendor 70B row's regions
    ("integrated HBM efficiency (0.8)", "bw_efficiency", (0.6, 0.9)),
    ("integrated chunked prefill (off)", "chunked", (True,)),
    ("largest integrated group (8)", "max_group", (16,)),
)


def sensitivity_jobs(config: ModelConfig, accelerator_name: str, a: Assumptions) -> int:
    """Unit searches of `sensitivity` (for a progress bar; a moved group bound or context can change it)."""
    per = len(integrated_groups(config, accelerator(accelerator_name), a)) + 1
    return per * (1 + sum(len(v) for _, _, v in SENSITIVITY))


def sensitivity(config: ModelConfig, spec: WaferSpec, accelerator_name: str, mix: str, power_kw: float,
                a: Assumptions = Assumptions(), requests: dict[str, int] | None = None, seed: int = 0,
                progress: Callable[[str], None] | None = None, table=SENSITIVITY) -> dict:
    """The ratio disaggregated / integrated at `a`, then with one assumption moved at a time; the
    disaggregated side keeps the balanced prefill count (no search around it), the integrated side
    its best group. Rows sorted by how far the goodput ratio moves (log scale), widest first."""
    chip = accelerator(accelerator_name)
    if mix not in MIXES:
        raise WaferError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    runner = _Runner(config, spec, requests or default_requests(1000), seed, progress)

    def ratios(x: Assumptions) -> dict:
        r = runner.best(chip, mix, x, power_kw, prefill_options="balanced")
        return {"goodput_ratio": r["goodput_ratio"], "fast_tokens_ratio": r["fast_tokens_ratio"],
                "disaggregated": r["disaggregated"]["unit"], "integrated": r["integrated"]["unit"],
                "disaggregated_goodput_req_s": r["disaggregated"]["goodput_req_s"],
                "integrated_goodput_req_s": r["integrated"]["goodput_req_s"]}

    base = ratios(a)
    rows = []
    for label, field, values in table:
        moved = []
        for v in values:
            if field == "accelerator_kw" and v == "board":
                x = dataclasses.replace(a, accelerator_kw=chip.watts / 1e3)
                shown = f"board {chip.watts / 1e3:g} kW"
            else:
                x = dataclasses.replace(a, **{field: v})
                shown = f"{v:g}" if isinstance(v, float) else str(v)
            moved.append({"value": shown, **ratios(x)})
        rows.append({"assumption": label, "field": field, "moves": moved, "swing": _swing(base, moved)})
    rows.sort(key=lambda r: -r["swing"])
    return {"accelerator": chip.name, "mix": mix, "power_kw": power_kw, "assumptions": dataclasses.asdict(a),
            "requests": runner.requests, "base": base, "rows": rows}


def _swing(base: dict, moved: list[dict]) -> float:
    """How far the goodput ratio moves from the base: the largest |ln(moved / base)|; a ratio that
    becomes or stops being defined or zero (a side serving nothing) counts as `UNBOUNDED_SWING`; a
    move after which neither side serves (e.g. prompts longer than the reserved context) is no
    move of the ratio and is left out."""
    b = base["goodput_ratio"]
    widest = 0.0
    for m in moved:
        if m.get("disaggregated_goodput_req_s") == 0 and m.get("integrated_goodput_req_s") == 0:
            continue
        r = m["goodput_ratio"]
        if not r or not b:
            if bool(r) != bool(b):
                return UNBOUNDED_SWING
            continue
        widest = max(widest, abs(math.log(r / b)))
    return widest
