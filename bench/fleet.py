"""Fleets for the simulator from presets, their footprint and cost, and the sweeps of `wafer simulate`.

A disaggregated fleet is N prefill accelerators and M wafers: M wafers make M // w decode
replicas (w wafers per replica, from the profiler's staging plan), each a simulator unit with
N / replicas accelerators of prefill (a fluid share, serve/simulator.py) and one KV link. An
integrated fleet is N accelerators in replicas of the smallest power-of-two group that holds the
weights and at least 8 caches of the reserved context; each replica is one unit.

Footprint is counted in board power (kW), the unit in which a datacentre provisions racks: the
accelerators' vendor board power, and a CS-3 system at 23 kW (the system power Cerebras quotes
for its CS-2/CS-3 systems; it includes the system's cooling and power supplies, which the
accelerator figures do not: a stated bias against the wafers). Cost per hour, when given, is per accelerator and per wafer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mesh.errors import WaferError
from mesh.wafer import WaferSpec
from model.config import ModelConfig
from serve.costs import (Accelerator, DensePrefillCost, DisaggregatedCost, IntegratedCost, KVLinkCost, Link,
                         MeasuredCost, RooflineDecodeCost, group_size, integrated_slots, wafer_decode,
                         weight_bytes)
from serve.events import Deadlines, Mode, SchedulerConfig
from serve.simulator import SLO, Fleet, Router, SimResult, simulate
from serve.workload import Workload, synthetic

CS3_KW = 23.0  # Cerebras CS-3 system power, datasheet


@dataclasses.dataclass(frozen=True)
class Policy:
    """The scheduler knobs a fleet sets per unit (slots come from the hardware)."""

    max_waiting: int = 4096
    max_prefill_batch: int = 16
    max_prefill_tokens: int = 16384
    deadlines: Deadlines = Deadlines(queue_s=600.0, prefill_s=600.0, handoff_s=600.0, token_s=600.0)
    router: Router = Router.LEAST_LOADED
    max_prefilled: int | None = None  # caches the prefill side holds; None: twice the slots


@dataclasses.dataclass(frozen=True)
class FleetPlan:
    """A fleet ready to simulate, with what it is made of."""

    fleet: Fleet
    description: dict
    power_kw: float | None
    cost_per_h: float | None


def _config(policy: Policy, mode: Mode, slots: int) -> SchedulerConfig:
    return SchedulerConfig(mode=mode, slots=slots, max_waiting=policy.max_waiting,
                           max_prefill_batch=policy.max_prefill_batch, max_prefill_tokens=policy.max_prefill_tokens,
                           max_prefilled=policy.max_prefilled or 2 * slots, deadlines=policy.deadlines)


def disaggregated(config: ModelConfig, chip: Accelerator, prefill_chips: int, spec: WaferSpec, grid: str,
                  wafers: int, link: Link, context: int, slots: int | None = None, mfu: float = 0.5,
                  policy: Policy = Policy(), prefill_cost_h: float | None = None,
                  wafer_cost_h: float | None = None) -> FleetPlan:
    if prefill_chips < 1 or wafers < 1:
        raise WaferError(f"a disaggregated fleet needs prefill and decode hardware (got {prefill_chips}, {wafers})")
    if prefill_chips * chip.memory_bytes * 0.9 < weight_bytes(config):
        raise WaferError(f"{config.name}'s {weight_bytes(config) / 1e9:,.0f} GB of weights do not fit "
                         f"{prefill_chips} {chip.name}(s) ({chip.memory_bytes / 1e9:,.0f} GB each, 90% usable)")
    decode = wafer_decode(config, spec, grid, context, slots)
    replicas = wafers // decode.wafers
    if replicas < 1:
        raise WaferError(f"{config.name} on {spec.name} {grid} needs {decode.wafers} wafers per replica, "
                         f"the fleet has {wafers}")
    cost = DisaggregatedCost(DensePrefillCost(config, chip, prefill_chips / replicas, mfu), decode,
                             KVLinkCost(config, link))
    fleet = Fleet(_config(policy, Mode.DISAGGREGATED, decode.slots), cost, replicas, policy.router,
                  max_context=context)
    power = None if chip.watts is None else prefill_chips * chip.watts / 1e3 + wafers * CS3_KW
    price = None if prefill_cost_h is None or wafer_cost_h is None else prefill_chips * prefill_cost_h + wafers * wafer_cost_h
    desc = {"mode": "disaggregated", "model": config.name, "prefill": f"{prefill_chips} x {chip.name}",
            "decode": f"{wafers} x {spec.name} ({replicas} replicas of {decode.wafers}, grid {grid})",
            "link": link.name, "slots": decode.slots, "context": context, "mfu": mfu,
            "decode_step_s": {"batch_1": decode.step_1_s, f"batch_{decode.slots}": decode.step_slots_s},
            "prefill_chips_per_unit": prefill_chips / replicas}
    return FleetPlan(fleet, desc, power, price)


def integrated(config: ModelConfig, chip: Accelerator, chips: int, context: int, chunked: bool = False,
               mfu: float = 0.5, bw_efficiency: float = 0.8, policy: Policy = Policy(),
               cost_h: float | None = None, group: int | None = None) -> FleetPlan:
    """`chips` in replicas of `group` accelerators (None: the smallest that holds the weights and
    8 caches, `group_size`)."""
    least = group_size(config, chip, context)
    if group is None:
        group = least
    elif group < least:
        raise WaferError(f"{config.name} at {context} context needs groups of at least {least} {chip.name}s, "
                         f"not {group}")
    replicas = chips // group
    if replicas < 1:
        raise WaferError(f"{config.name} needs groups of {group} {chip.name}s at {context} context; "
                         f"the fleet has {chips}")
    slots = integrated_slots(config, chip, group, context)
    cost = IntegratedCost(DensePrefillCost(config, chip, group, mfu),
                          RooflineDecodeCost(config, chip, group, mfu, bw_efficiency), chunked)
    fleet = Fleet(_config(policy, Mode.INTEGRATED, slots), cost, replicas, policy.router, max_context=context)
    power = None if chip.watts is None else chips * chip.watts / 1e3
    desc = {"mode": "integrated", "model": config.name, "chips": f"{chips} x {chip.name}",
            "replicas": f"{replicas} of {group}", "slots": slots, "context": context, "chunked_prefill": chunked,
            "mfu": mfu, "bw_efficiency": bw_efficiency}
    return FleetPlan(fleet, desc, power, None if cost_h is None else chips * cost_h)


def measured(cost: MeasuredCost, mode: Mode, units: int = 1, policy: Policy = Policy()) -> FleetPlan:
    slots = cost.slots or 8
    fleet = Fleet(_config(policy, mode, slots), cost, units, policy.router)
    return FleetPlan(fleet, {"mode": mode.value, "cost": "measured", "note": cost.note, "slots": slots,
                             "units": units}, None, None)


def report(plan: FleetPlan, result: SimResult) -> dict:
    """The simulation's summary with the fleet's description and its cost per unit of goodput."""
    s = result.summary()
    s["fleet"] = plan.description
    good = s["goodput_req_s"]
    if plan.power_kw is not None:
        s["power_kw"] = plan.power_kw
        s["goodput_req_s_per_kw"] = good / plan.power_kw
        s["fast_tokens_s_per_kw"] = s["fast_tokens_s"] / plan.power_kw
    if plan.cost_per_h is not None:
        s["cost_per_h"] = plan.cost_per_h
        s["cost_per_1k_good_requests"] = plan.cost_per_h / 3600 / good * 1e3 if good > 0 else None
    return s


def capacity(plan: FleetPlan, make: Callable[[float], Workload], slo: SLO, rate: float, attainment: float = 0.9,
             steps: int = 6, max_rate: float | None = None) -> tuple[float, dict]:
    """DistServe's goodput capacity: the highest arrival rate at which at least `attainment` of the
    requests meet both SLOs, for workloads `make(rate)`. Doubles or halves from `rate` to bracket
    it (at most 12 times), then bisects `steps` times (to within 2**-steps of the bracket).
    Returns the rate (0 if even rate / 4096 fails) and the summary of the run at that rate, marked
    `capped` when the rate is only a lower bound (it still passed at rate x 4096, or at `max_rate`:
    past it a finite workload arrives faster than the SLOs can tell, e.g. within the TTFT SLO)."""
    def run(r: float) -> dict:
        return report(plan, simulate(plan.fleet, make(r), slo))

    def ok(s: dict) -> bool:
        return s["slo_attainment"] >= attainment

    if max_rate is not None:
        rate = min(rate, max_rate)
    s = run(rate)
    if ok(s):
        lo, best = rate, s
        for _ in range(12):
            if max_rate is not None and lo >= max_rate:
                return lo, dict(best, capped=True)
            hi = 2 * lo if max_rate is None else min(2 * lo, max_rate)
            s = run(hi)
            if not ok(s):
                break
            lo, best = hi, s
        else:
            return lo, dict(best, capped=True)  # still passing after 12 doublings: a lower bound
    else:
        hi, lo, best = rate, None, None
        for _ in range(12):
            s = run(hi / 2)
            if ok(s):
                lo, best = hi / 2, s
                break
            hi /= 2
        if lo is None:
            return 0.0, s
    for _ in range(steps):
        mid = (lo + hi) / 2
        s = run(mid)
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid
    return lo, best


def best_ratio(config: ModelConfig, chip: Accelerator, spec: WaferSpec, grid: str, link: Link, context: int,
               power_kw: float, make: Callable[[float], Workload], rate: float, slo: SLO, mfu: float = 0.5,
               policy: Policy = Policy(), progress=None) -> list[dict]:
    """Every split of `power_kw` into prefill accelerators and whole decode replicas, with its
    goodput capacity (`capacity`) on workloads `make(rate)`; rows sorted best first."""
    if chip.watts is None:
        raise WaferError(f"{chip.name} has no board power in its preset: a power footprint needs one")
    per_replica = wafer_decode(config, spec, grid, context).wafers
    rows = []
    replicas = 1
    while replicas * per_replica * CS3_KW < power_kw:
        wafers = replicas * per_replica
        chips = int((power_kw - wafers * CS3_KW) * 1e3 // chip.watts)
        if chips >= 1:
            plan = disaggregated(config, chip, chips, spec, grid, wafers, link, context, mfu=mfu, policy=policy)
            cap, s = capacity(plan, make, slo, rate)
            rows.append({"prefill_chips": chips, "wafers": wafers, "capacity_req_s": cap,
                         "fast_tokens_s": s["fast_tokens_s"], "ttft_p90_s": s["ttft_s"]["p90"],
                         "tpot_p90_s": s["tpot_s"]["p90"], "capped": s.get("capped", False)})
            if progress:
                progress(rows[-1])
        replicas += 1
    return sorted(rows, key=lambda r: -r["capacity_req_s"])


def crossover(config: ModelConfig, chip: Accelerator, spec: WaferSpec, grid: str, link: Link, context: int,
              power_kw: float, requests: int, rate: float, total_tokens: int, ratios: list[float], slo: SLO,
              seed: int = 0, mfu: float = 0.5, policy: Policy = Policy(), progress=None) -> list[dict]:
    """Goodput capacity of disaggregated (the best split of the footprint) vs integrated (the same
    power in accelerators), as the input:output ratio of `total_tokens` per request varies."""
    if chip.watts is None:
        raise WaferError(f"{chip.name} has no board power in its preset: a power footprint needs one")
    rows = []
    chips = int(power_kw * 1e3 // chip.watts)
    for ratio in ratios:
        out = max(1, round(total_tokens / (1 + ratio)))
        inp = max(1, total_tokens - out)

        def make(r: float, inp=inp, out=out) -> Workload:
            return synthetic(requests, r, inp, out, seed)

        split = best_ratio(config, chip, spec, grid, link, context, power_kw, make, rate, slo, mfu, policy)
        integrated_cap, integrated_s = capacity(integrated(config, chip, chips, context, policy=policy), make, slo, rate)
        best = split[0] if split else None
        disagg_cap = best["capacity_req_s"] if best else 0.0
        rows.append({"input": inp, "output": out, "ratio": ratio, "disaggregated_req_s": disagg_cap,
                     "disaggregated_split": f"{best['prefill_chips']}:{best['wafers']}" if best else None,
                     "integrated_req_s": integrated_cap, "capped": bool(best and best["capped"])
                     or integrated_s.get("capped", False),
                     "winner": "disaggregated" if disagg_cap > integrated_cap else "integrated"})
        if progress:
            progress(rows[-1])
    return rows
