"""`wafer bench serve-costs`: the simulator's *measured* cost source, profiled from this machine's
real serving workers (issue 14).

The workers' own classes (serve/workers.py: `PrefillWorker`, `DecodeWorker`, `IntegratedWorker`)
run in fresh processes pinned to the CPUs `wafer serve` gives them (serve.engine.split_cpus, the
same options and flags): disaggregated, the prefill batches are timed in a process on the prefill
worker's CPUs and the decode steps and handoffs in one on the decode worker's; integrated, all of
it in one process on all the CPUs. Each figure is the median of `repeats` after one unmeasured run
(which compiles that shape's programs, as a warmed-up server has):

- prefill: a `PrefillBatch` of `b` prompts of `T` tokens, for every `b` in `prefill_batches` and
  `T` in `prompt_lens` (the worker's own apply: the padded prefill, and the caches kept for
  shipping or, integrated, placed into their slots);
- decode: a `Step` over `b` occupied slots each holding `c` positions, for every `b` in
  `occupancies` and `c` in `contexts` (the slots are filled with zero caches: a step's time does
  not depend on what the cache holds);
- handoff (disaggregated): `Ship` to `Landed` of a prompt of `T` tokens into a slot, over TCP,
  for every `T` in `prompt_lens` (bench.serve_overhead.ship_and_land). Sender and receiver share
  the decode worker's CPUs here, while the server's sender runs on the prefill worker's;
- contention (disaggregated): the two workers run on different CPUs of one machine and still slow
  each other down (shared cores, caches, memory bandwidth, and what other work on the machine
  leaves them: on this 2-vCPU machine, with another session's tests running, a prefill took 3x
  longer while the decode worker stepped; quiet, no longer). So the prefills of the first batch size are timed
  again while a second process keeps the decode worker stepping a full batch on its CPUs, and the
  steps of the first context while a process keeps the prefill worker prefilling the longest
  prompt; each worker's slowdown is the median ratio to its solo figures of the same shapes
  (`contention` in the file; serve.costs.MeasuredCost says how the simulator uses it).

The samples are fitted with `serve.costs.fit_measured` and written as a measured cost file with the
samples, the fits' residuals, the server's scheduler policy and a note of how, where and when.
The prefill fit is over the shapes the worker really computes: it pads a batch to a power of two
of prompts, each to the longest rounded up to 32 tokens (serve.costs.PaddedMeasuredCost prices a
batch the same way).

This module's top level imports nothing heavy: the measuring processes are spawned and import it
before they pin their CPUs (see serve/worker_process.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import platform
import statistics
import time
from typing import Callable

from mesh.errors import WaferError

# The measuring process reports one of these per sample, then ("done", samples) or ("error", why);
# a process keeping a worker busy reports ("busy", None) once its programs are compiled.
_PROGRESS, _DONE, _ERROR, _BUSY = "progress", "done", "error", "busy"
CHILD_TIMEOUT_S = 1800.0  # a whole phase; compilation on two busy CPUs is most of it


@dataclasses.dataclass(frozen=True)
class CostsBench:
    """What to measure, on the server set up by `options` (serve.options.EngineOptions)."""

    options: object
    prompt_lens: tuple[int, ...] = (32, 128, 256)
    prefill_batches: tuple[int, ...] = (1, 2, 4)
    occupancies: tuple[int, ...] = (1, 4, 8)
    contexts: tuple[int, ...] = (64, 256)
    repeats: int = 5

    def __post_init__(self):
        opts = self.options
        slots = opts.scheduler.slots
        for name in ("prompt_lens", "prefill_batches", "occupancies", "contexts"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise WaferError(f"{name.replace('_', ' ')}: need at least one positive value, got {list(values)}")
        if self.repeats < 1:
            raise WaferError(f"repeats must be at least 1, got {self.repeats}")
        if max(self.occupancies) > slots:
            raise WaferError(f"occupancy {max(self.occupancies)} exceeds the {slots} decode slots (--slots)")
        if max(self.prefill_batches) > slots and opts.mode.value == "integrated":
            raise WaferError(f"an integrated prefill batch of {max(self.prefill_batches)} needs as many slots "
                             f"(--slots {slots})")
        room = opts.max_len - self.repeats - 2  # a slot also holds the steps timed on it
        if max(self.contexts) > room or max(self.prompt_lens) >= opts.max_len:
            raise WaferError(f"prompt lengths and contexts must leave room in --max-len {opts.max_len} "
                             f"(longest prompt {max(self.prompt_lens)}, context {max(self.contexts)})")

    @property
    def samples(self) -> dict[str, int]:
        """How many timed shapes each phase has (for the progress bar)."""
        integrated = self.options.mode.value == "integrated"
        return {"prefill": len(self.prompt_lens) * len(self.prefill_batches),
                "decode": len(self.occupancies) * len(self.contexts),
                "handoff": 0 if integrated else len(self.prompt_lens),
                "contention": 0 if integrated else len(self.prompt_lens) + len(self.occupancies)}

    def contended(self) -> "CostsBench":
        """The shapes timed again beside the other worker: the first batch size and context."""
        return dataclasses.replace(self, prefill_batches=self.prefill_batches[:1], contexts=self.contexts[:1])


def _median_timed(fn: Callable[[], float], repeats: int) -> float:
    """The median of `repeats` timings of `fn` (which returns its own seconds) after one unmeasured."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def _prompt(vocab_size: int, n: int, k: int) -> tuple[int, ...]:
    from bench.serve_overhead import prompt_ids
    ids = prompt_ids(vocab_size, n + k)
    return ids[k:]  # a different prompt per repeat, all of length n


def _measure(bench: CostsBench, role_name: str, phases: tuple[str, ...], send: Callable, stop=None) -> dict:
    """In a pinned process: the samples of `phases` on the worker(s) of role `role_name`; or, for
    the phase "busy", that worker kept working (the prefill worker prefilling the longest prompt,
    the decode worker stepping a full batch) until `stop` (an Event) is set."""
    import numpy as np

    from bench.serve_overhead import Reports, ship_and_land
    from model.load import load_model
    from model.sampling import Sampling
    from serve.worker_messages import Discard, Evict, PrefillBatch, PrefillItem, PrefillReport, Step, StepReport
    from serve.worker_spec import Role, WorkerSpec
    from serve.workers import DecodeWorker, IntegratedWorker, PrefillWorker

    opts, role = bench.options, Role(role_name)
    loaded = load_model(opts.model, opts.checkpoint)
    cfg = loaded.config
    reports = Reports()
    out: dict[str, list] = {"prefill": [], "decode": [], "handoff": []}
    workers = []
    try:
        if role is Role.INTEGRATED:
            prefill = decode = IntegratedWorker(loaded, WorkerSpec(role, opts), reports)
            workers.append(prefill)
        else:
            prefill = PrefillWorker(loaded, WorkerSpec(Role.PREFILL, opts), reports)
            workers.append(prefill)
            decode = None
            if {"decode", "handoff"} & set(phases) or role is Role.DECODE:
                decode = DecodeWorker(loaded, WorkerSpec(Role.DECODE, opts), reports)
                workers.append(decode)
        count = iter(range(1 << 30))

        def prefill_once(b: int, t: int) -> float:
            k = next(count)
            items = tuple(PrefillItem(f"p{k}-{i}", _prompt(cfg.vocab_size, t, k + i), Sampling(),
                                      i if role is Role.INTEGRATED else None) for i in range(b))
            t0 = time.perf_counter()
            prefill.apply(PrefillBatch(items))
            seconds = time.perf_counter() - t0
            report = reports.take(PrefillReport)
            if any(token is None for _, token in report.outcomes):
                raise WaferError(f"the prefill of {b} x {t} tokens failed: {report.detail}")
            for i, item in enumerate(items):  # free what the batch holds for the next one
                prefill.apply(Evict(i) if role is Role.INTEGRATED else Discard(item.request_id))
            return seconds

        if "busy" in phases:
            _keep_busy(bench, cfg, prefill if role is Role.PREFILL else decode, reports, role is Role.PREFILL,
                       lambda: prefill_once(1, max(bench.prompt_lens)), send, stop)

        if "prefill" in phases:
            for b in bench.prefill_batches:
                for t in bench.prompt_lens:
                    out["prefill"].append([[t] * b, _median_timed(lambda: prefill_once(b, t), bench.repeats)])
                    send((_PROGRESS, 1))

        if "handoff" in phases:
            def handoff_once(t: int) -> float:
                k = next(count)
                rid = f"h{k}"
                prefill.apply(PrefillBatch((PrefillItem(rid, _prompt(cfg.vocab_size, t, k), Sampling()),)))
                reports.take(PrefillReport)
                seconds = ship_and_land(prefill, decode, reports, rid, 0, t)
                decode.apply(Evict(0))
                return seconds

            for t in bench.prompt_lens:
                out["handoff"].append([t, _median_timed(lambda: handoff_once(t), bench.repeats)])
                send((_PROGRESS, 1))

        if decode is not None:  # what --schedule auto chose in this process (the server chooses in its own)
            out["schedule"] = decode.slots.batch.opts.schedule.value
        if "decode" in phases:
            slots = decode.slots
            for b in bench.occupancies:
                for c in bench.contexts:
                    zeros = np.zeros((cfg.n_kv_heads, c, cfg.head_dim), np.float32)
                    for s in range(b):
                        slots.insert(s, f"d{s}", Sampling(), [zeros] * cfg.n_layers, [zeros] * cfg.n_layers, c, 1)
                    steps = []

                    def step_once() -> float:
                        t0 = time.perf_counter()
                        decode.apply(Step())
                        seconds = time.perf_counter() - t0
                        reports.take(StepReport)
                        steps.append(seconds)
                        return seconds

                    seconds = _median_timed(step_once, bench.repeats)
                    # The context grows by one position per slot per step: the middle timed step's.
                    middle = 1 + bench.repeats // 2
                    out["decode"].append([b, b * (c + middle + 1), seconds])
                    for s in range(b):
                        decode.apply(Evict(s))
                    send((_PROGRESS, 1))
    finally:
        for w in workers:
            w.close()
    return out


def _keep_busy(bench: CostsBench, cfg, worker, reports, prefilling: bool, prefill_once: Callable[[], float],
               send: Callable, stop) -> None:
    """Work until `stop` is set, saying ("busy", None) once the first round (which compiles) ran."""
    import numpy as np

    from model.sampling import Sampling
    from serve.worker_messages import Evict, Step, StepReport

    if prefilling:
        prefill_once()
        send((_BUSY, None))
        while not stop.is_set():
            prefill_once()
        return
    slots = worker.slots
    b, c = max(bench.occupancies), min(bench.contexts)
    zeros = np.zeros((cfg.n_kv_heads, c, cfg.head_dim), np.float32)
    first = True
    while not stop.is_set():
        for s in range(b):  # a full batch at the shortest context, refilled before it runs out of room
            slots.insert(s, f"busy{s}", Sampling(), [zeros] * cfg.n_layers, [zeros] * cfg.n_layers, c, 1)
        for _ in range(bench.options.max_len - c - 2):
            worker.apply(Step())
            reports.take(StepReport)
            if first:
                send((_BUSY, None))
                first = False
            if stop.is_set():
                break
        for s in range(b):
            worker.apply(Evict(s))


def _child(cpus: tuple[int, ...], bench: CostsBench, role_name: str, phases: tuple[str, ...], conn,
           stop=None) -> None:
    """The measuring process: pinned and set up as a worker process is, then `_measure`."""
    from serve.worker_process import pin_fresh_process
    pin_fresh_process(cpus)
    try:
        from mesh.devices import ensure_cpu_devices
        from serve.worker_spec import Role, WorkerSpec
        # The devices of the worker measured (the decode process also prefills the caches it ships).
        roles = [Role(role_name)] if role_name != "decode" else [Role.PREFILL, Role.DECODE]
        ensure_cpu_devices(max(WorkerSpec(r, bench.options).devices for r in roles))
        import jax

        from model.load import cache_dir
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))  # as the workers do
        samples = _measure(bench, role_name, phases, conn.send, stop)
        samples["jax"] = jax.__version__
        samples["device_kind"] = jax.devices()[0].device_kind
        samples["cpus"] = sorted(os.sched_getaffinity(0))
        conn.send((_DONE, samples))
    except Exception as e:  # noqa: BLE001 (reported to the parent as one line)
        conn.send((_ERROR, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _start(cpus: tuple[int, ...], bench: CostsBench, role_name: str, phases: tuple[str, ...], stop=None):
    """A measuring process started: (the process, the end of the pipe it reports to)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cpus, bench, role_name, phases, child, stop), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _await(proc, parent, role_name: str, on_sample: Callable[[], None]):
    """What the process reports when it is done (or busy), counting its samples on the way."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        if not parent.poll(max(0.0, deadline - time.monotonic())):
            raise WaferError(f"the {role_name} measurement took over {CHILD_TIMEOUT_S:g} s")
        try:
            kind, value = parent.recv()
        except EOFError:
            raise WaferError(f"the {role_name} measuring process died (exit code {proc.exitcode})") from None
        if kind == _PROGRESS:
            on_sample()
        elif kind == _ERROR:
            raise WaferError(f"the {role_name} measurement failed: {value}")
        else:
            return value


def _reap(proc) -> None:
    proc.join(10.0)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _run_phase(cpus: tuple[int, ...], bench: CostsBench, role_name: str, phases: tuple[str, ...],
               on_sample: Callable[[], None]) -> dict:
    proc, parent = _start(cpus, bench, role_name, phases)
    try:
        return _await(proc, parent, role_name, on_sample)
    finally:
        _reap(proc)


def _beside_busy(busy_cpus: tuple[int, ...], busy_role: str, cpus: tuple[int, ...], bench: CostsBench,
                 role_name: str, phases: tuple[str, ...], on_sample: Callable[[], None]) -> dict:
    """`_run_phase` while another process keeps the `busy_role` worker working on `busy_cpus`."""
    stop = multiprocessing.get_context("spawn").Event()
    busy, pipe = _start(busy_cpus, bench, busy_role, ("busy",), stop)
    try:
        _await(busy, pipe, busy_role, lambda: None)  # compiled and working
        return _run_phase(cpus, bench.contended(), role_name, phases, on_sample)
    finally:
        stop.set()
        _reap(busy)


def slowdown(solo: list, contended: list) -> float:
    """The median ratio of contended to solo times over the shapes both timed (samples as
    `_measure` takes them: the shape first, the seconds last), at least 1: a worker does not run
    faster because the other one works, so a median below 1 is the machine's noise (a quiet run
    gave 0.81) and would price a prefill beside a stepping decode worker as faster than alone."""
    alone = {repr(x[:-1]): x[-1] for x in solo}
    return max(1.0, statistics.median(x[-1] / alone[repr(x[:-1])] for x in contended))


def padded_lens(prompt_lens, bucket: int) -> list[int]:
    """The prompt lengths a prefill batch really computes (serve/workers.py and model/prefill.py):
    a power of two of prompts, each as long as the longest rounded up to `bucket`."""
    n = len(prompt_lens)
    longest = -(-max(prompt_lens) // bucket) * bucket
    return [longest] * (1 << (n - 1).bit_length())


def fit_samples(samples: dict, slots: int, bucket: int):
    """A `PaddedMeasuredCost` fitted (serve.costs.fit_measured, non-negative coefficients of least
    relative error) to samples as `_measure` takes them:
    prefill [prompt lengths, s] (fitted over their padded shapes), decode [batch, context, s],
    handoff [tokens, s] (none: integrated, a zero cost)."""
    from serve.costs import PaddedMeasuredCost, fit_measured, nonneg_relative_fit

    handoff = samples["handoff"] or [[1, 0.0], [2, 0.0]]
    fitted = fit_measured([(padded_lens(lens, bucket), s) for lens, s in samples["prefill"]],
                          [tuple(x) for x in samples["decode"]], [tuple(x) for x in handoff], slots,
                          solve=nonneg_relative_fit)
    return PaddedMeasuredCost(fitted.prefill, fitted.decode, fitted.handoff, fitted.slots, "", bucket=bucket)


def residuals(cost, samples: dict) -> dict:
    """The largest relative error of each fit over its own samples."""
    def worst(pairs):
        return max((abs(model - s) / s for model, s in pairs if s > 0), default=0.0)
    return {"prefill": worst((cost.prefill_s(lens), s) for lens, s in samples["prefill"]),
            "decode": worst((cost.decode_step_s(b, c), s) for b, c, s in samples["decode"]),
            "handoff": worst((cost.handoff_s(t), s) for t, s in samples["handoff"])}


def run_costs_bench(bench: CostsBench, on_sample: Callable[[], None] = lambda: None) -> dict:
    """Measure, fit, and return the measured cost file's contents (serve.costs.MeasuredCost's
    format plus `padding`, `scheduler`, `samples`, `residuals` and `env`)."""
    from model.generate import PROMPT_BUCKET
    from serve.engine import split_cpus
    from serve.worker_spec import Role

    opts = bench.options
    cpus = split_cpus(opts)
    load_start = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    if opts.mode.value == "integrated":
        samples = _run_phase(cpus[Role.INTEGRATED], bench, "integrated", ("prefill", "decode"), on_sample)
        where = {"integrated": samples.pop("cpus")}
    else:
        pre = _run_phase(cpus[Role.PREFILL], bench, "prefill", ("prefill",), on_sample)
        samples = _run_phase(cpus[Role.DECODE], bench, "decode", ("handoff", "decode"), on_sample)
        samples["prefill"] = pre["prefill"]
        where = {"prefill": pre["cpus"], "decode": samples.pop("cpus")}
        beside_decode = _beside_busy(cpus[Role.DECODE], "decode", cpus[Role.PREFILL], bench, "prefill", ("prefill",),
                                     on_sample)["prefill"]
        beside_prefill = _beside_busy(cpus[Role.PREFILL], "prefill", cpus[Role.DECODE], bench, "decode", ("decode",),
                                      on_sample)["decode"]
        samples["contention"] = {"prefill": beside_decode, "decode": beside_prefill}
    cost = fit_samples(samples, opts.scheduler.slots, PROMPT_BUCKET)
    if "contention" in samples:
        busy = samples["contention"]
        cost = dataclasses.replace(cost, contention={"prefill": slowdown(samples["prefill"], busy["prefill"]),
                                                     "decode": slowdown(samples["decode"], busy["decode"])})
    grid = f"prefill mesh {opts.prefill_grid.rows}x{opts.prefill_grid.cols}, decode mesh " \
           f"{opts.decode_grid.rows}x{opts.decode_grid.cols} ({opts.executor.value})"
    # The all-reduce schedule the decode steps ran: with --schedule auto each process measures its
    # own at start, and a server that picks another one steps at another speed (name it for both).
    schedule = samples.get("schedule") or "-"
    chosen = "auto: " if opts.schedule is None else ""
    note = (f"wafer bench serve-costs, {started}, {platform.node()}: {opts.mode.value} workers of "
            f"{opts.model or opts.checkpoint or 'the embedded model'} ({grid}, schedule {chosen}{schedule}, "
            f"{opts.scheduler.slots} slots, max-len {opts.max_len}) on CPUs {where}, median of {bench.repeats} "
            f"per shape, load average {load_start:.2f}")
    # Disaggregated, the server ships each cache from a thread of its prefill worker, pinned to the
    # prefill worker's CPUs: the simulator must not run handoffs beside that worker's prefills.
    disaggregated = opts.mode.value == "disaggregated"  # the server's handoff path (serve/workers.py)
    out = dataclasses.replace(cost, note=note, handoff_on_prefill=disaggregated,
                              listens_between_steps=disaggregated).to_json()
    sched = opts.scheduler
    out.update({
        "scheduler": {"mode": opts.mode.value, "slots": sched.slots, "max_waiting": sched.max_waiting,
                      "max_prefill_batch": sched.max_prefill_batch, "max_prefill_tokens": sched.max_prefill_tokens,
                      "max_prefilled": sched.max_prefilled, "deadlines": dataclasses.asdict(sched.deadlines)},
        "max_len": opts.max_len,
        "samples": {k: samples[k] for k in ("prefill", "decode", "handoff", "contention") if k in samples},
        "residuals": residuals(cost, samples),
        "env": {"started_utc": started, "host": platform.node(), "cpus": where, "decode_schedule": schedule,
                "schedule_flag": opts.schedule.value if opts.schedule else "auto", "jax": samples["jax"],
                "device_kind": samples["device_kind"], "loadavg_1m_start": round(load_start, 2),
                "loadavg_1m_end": round(os.getloadavg()[0], 2), "wall_s": round(time.perf_counter() - t0, 1)},
    })
    return out


def format_report(r: dict) -> str:
    p, d, h = r["prefill"], r["decode"], r["handoff"]
    res = r["residuals"]
    return "\n".join([
        f"measured costs: {r['note']}",
        f"  prefill  {p['fixed_s'] * 1e3:8.2f} ms + {p['per_token_s'] * 1e6:8.2f} us/token + "
        f"{p['per_token2_s'] * 1e9:8.3f} ns/token^2 over the padded batch  (worst fit error {res['prefill']:.1%}, "
        f"{len(r['samples']['prefill'])} shapes)",
        f"  decode   {d['fixed_s'] * 1e3:8.2f} ms + {d['per_seq_s'] * 1e3:8.3f} ms/sequence + "
        f"{d['per_context_token_s'] * 1e6:8.3f} us/context position  (worst fit error {res['decode']:.1%}, "
        f"{len(r['samples']['decode'])} shapes)",
        f"  handoff  {h['fixed_s'] * 1e3:8.2f} ms + {h['per_token_s'] * 1e6:8.2f} us/token  "
        f"(worst fit error {res['handoff']:.1%}, {len(r['samples']['handoff'])} lengths)",
        *([f"  contention: a prefill takes {c['prefill']:.2f}x its time while the decode worker steps, a "
           f"decode step {c['decode']:.2f}x while the prefill worker prefills"] if (c := r.get("contention")) else []),
        f"  jax {r['env']['jax']}, {r['env']['device_kind']}, CPUs {r['env']['cpus']}, "
        f"{r['env']['wall_s']:.0f} s, load average {r['env']['loadavg_1m_start']} -> {r['env']['loadavg_1m_end']}",
    ])
