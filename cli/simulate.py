"""`wafer simulate`: the serving scheduler on a simulated clock, over a fleet built from presets.

A workload (synthetic arrivals with `--rate`, `--requests`, lengths or a `--profile`; or an Azure
`--trace`; or `--replay REPORT`, the exact requests of a `wafer bench serve --per-request` run,
compared figure by figure with that run's), a fleet (`--prefill N --decode M` accelerators and wafers, or `--integrated N`
accelerators; or `--measured FILE` with `--units`), SLOs. Reports TTFT/TPOT/E2E percentiles,
goodput, fast-token capacity, utilisation per pool, and power or cost per unit of goodput; one
JSON object with `--json`, PNGs with `--plot DIR`. `--sweep ratio` finds the best prefill:decode
split of a power footprint; `--sweep crossover` compares it with an integrated fleet of the same
power as the input:output ratio varies. `--sweep question` answers issue 14 (disaggregated onto
wafers vs integrated, equal power, per accelerator and mix: goodput, fast-token capacity, their
ratios); `--sweep sensitivity` moves its assumptions one at a time (bench/fleet_question.py).
A progress bar runs on stderr.
"""

from __future__ import annotations

import argparse
import json
import time

from cli.flags import non_negative_float, positive_float, positive_int, progress, progress_bar
from mesh.errors import WaferError

# Without fleet flags: 8 prefill accelerators and 4 decode replicas (as many wafers as that takes).
DEFAULT_PREFILL = 8
DEFAULT_REPLICAS = 4
DEFAULT_REQUESTS = 10000
QUESTION_REQUESTS = 1000
QUESTION_FAST_SPEED = 100.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=positive_int, default=None,
                   help="requests to simulate (default 10000; question/sensitivity: per simulation, default "
                        f"{QUESTION_REQUESTS} for chat and code, half for agentic)")
    w.add_argument("--rate", type=positive_float, default=10.0, help="arrivals per second (default 10)")
    w.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, <1 burstier (default 1)")
    w.add_argument("--profile", choices=["chat", "code", "agentic"], default="chat",
                   help="input/output lengths: chat 256/128, code 2048/32, agentic 256/1920 (default chat)")
    w.add_argument("--input-len", type=positive_int, default=None, help="mean prompt tokens (overrides --profile)")
    w.add_argument("--output-len", type=positive_int, default=None, help="mean output tokens (overrides --profile)")
    w.add_argument("--length-dist", choices=["fixed", "exponential", "uniform"], default="fixed",
                   help="lengths around their means (default fixed)")
    w.add_argument("--trace", default=None, metavar="FILE",
                   help="an Azure LLM trace CSV, or 'code'/'conv' for the shipped ones (replayed to --requests)")
    w.add_argument("--replay", default=None, metavar="FILE",
                   help="the requests a `wafer bench serve --json --per-request` run sent: same arrivals and lengths")
    w.add_argument("--replay-rate", type=positive_float, default=None,
                   help="with --replay: the rate of the run to replay, when the report holds several")
    w.add_argument("--calibrate", action="store_true",
                   help="with --replay and --measured: also simulate with the cost file's prefill and decode "
                        "times scaled to the level the server's workers ran at during the run (its /metrics, "
                        "recorded by `wafer bench serve`), and compare that too")
    w.add_argument("--conditioning", type=positive_int, default=None, metavar="DRAWS",
                   help="with --measured: simulate DRAWS more times with every arrival moved by up to "
                        "--jitter-ms and the prefill and decode costs scaled by up to --cost-spread, and report "
                        "how often each figure moves beyond its validation tolerance (a quantile on a cliff)")
    w.add_argument("--jitter-ms", type=non_negative_float, default=60.0,
                   help="with --conditioning: the largest shift of an arrival (default 60)")
    w.add_argument("--cost-spread", type=non_negative_float, default=0.08,
                   help="with --conditioning: the largest relative change of the costs (default 0.08)")
    w.add_argument("--time-scale", type=positive_float, default=1.0,
                   help="multiply trace arrival times (0.5 doubles the rate)")
    w.add_argument("--seed", type=int, default=0)

    f = p.add_argument_group("fleet")
    f.add_argument("--model", default="llama3.1-70b", help="model preset (default llama3.1-70b)")
    f.add_argument("--prefill", type=positive_int, default=None,
                   help=f"prefill accelerators (disaggregated; default {DEFAULT_PREFILL})")
    f.add_argument("--decode", type=positive_int, default=None,
                   help=f"decode wafers (disaggregated; default: {DEFAULT_REPLICAS} replicas' worth)")
    f.add_argument("--integrated", type=positive_int, default=None,
                   help="accelerators doing both phases (the integrated baseline)")
    f.add_argument("--chunked-prefill", action="store_true", help="integrated: price prefill as chunks")
    f.add_argument("--accelerator", default=None,
                   help="h100, b200, trainium2, trainium3 (default h100; --sweep question: a comma list, "
                        "default h100,b200)")
    f.add_argument("--wafer", default="wse3", help="wafer spec (default wse3)")
    f.add_argument("--grid", default="360x360", help="RxC cores per decode stage (default 360x360)")
    f.add_argument("--slots", type=positive_int, default=None,
                   help="decode batch per replica (default: the most that fit the wafers' SRAM)")
    f.add_argument("--context", type=positive_int, default=4096, help="KV positions reserved per slot")
    f.add_argument("--link", default="efa3", help="KV link: efa1..efa4 (default efa3)")
    f.add_argument("--mfu", type=positive_float, default=0.5, help="prefill model-FLOPs utilisation (assumption)")
    f.add_argument("--measured", default=None, metavar="FILE", help="a measured cost file instead of presets")
    f.add_argument("--mode", choices=["disaggregated", "integrated"], default=None,
                   help="with --measured: the scheduler's mode (default: the file's, else disaggregated)")
    f.add_argument("--units", type=positive_int, default=1, help="with --measured: worker pairs")
    f.add_argument("--router", choices=["least-loaded", "round-robin"], default="least-loaded")
    f.add_argument("--processes", type=positive_int, default=1,
                   help="simulate the units in this many processes (needs --router round-robin)")
    f.add_argument("--max-waiting", type=positive_int, default=None,
                   help="waiting queue bound per unit (default 4096, or the measured file's server's)")
    f.add_argument("--prefill-cost-h", type=positive_float, default=None, help="$/h per prefill accelerator")
    f.add_argument("--decode-cost-h", type=positive_float, default=None, help="$/h per wafer")

    s = p.add_argument_group("SLOs and reports")
    s.add_argument("--ttft-slo", type=positive_float, default=2.0, help="seconds (default 2)")
    s.add_argument("--tpot-slo", type=positive_float, default=None,
                   help="seconds (default 0.1; question/sensitivity: 1 / --fast-speed)")
    s.add_argument("--fast-speed", type=positive_float, default=None,
                   help=f"tokens/s per user above which tokens count as fast (default 20; question/sensitivity: "
                        f"{QUESTION_FAST_SPEED:g})")
    s.add_argument("--sweep", choices=["ratio", "crossover", "question", "sensitivity"], default=None,
                   help="ratio: best prefill:decode split of --power-kw; crossover: vs integrated by input:output; "
                        "question: disaggregated onto wafers vs integrated per mix at equal power; sensitivity: "
                        "the question's ratio with one assumption moved at a time")
    s.add_argument("--mixes", default=None,
                   help="question: comma list of chat,code,agentic (default all); sensitivity: one (default chat)")
    s.add_argument("--wafer-kw", type=positive_float, default=None,
                   help="question/sensitivity: kW per wafer system (default 23, CS-3 datasheet)")
    s.add_argument("--accelerator-kw", type=positive_float, default=None,
                   help="question/sensitivity: kW per accelerator (default its preset's system share)")
    s.add_argument("--power-kw", type=positive_float, default=None, help="footprint for --sweep, in kW")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to DIR")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _defaults(args) -> None:
    """Flags whose defaults differ between one simulation and the question's sweeps."""
    question = args.sweep in ("question", "sensitivity")
    if args.calibrate and (args.replay is None or args.measured is None):
        raise WaferError("--calibrate needs --replay (the run whose worker times it scales to) and --measured "
                         "(the cost file it scales)")
    if args.conditioning is not None and (args.measured is None or args.sweep):
        raise WaferError("--conditioning needs --measured (a cost it can scale) and one simulation, no --sweep")
    if args.cost_spread >= 1:
        raise WaferError(f"--cost-spread {args.cost_spread:g}: must be under 1 (a cost scaled by up to 1 ± it)")
    if question:
        given = [f"--{k.replace('_', '-')}" for k in ("trace", "measured", "prefill", "decode", "integrated", "slots",
                                                     "input_len", "output_len") if getattr(args, k) is not None]
        if given:
            raise WaferError(f"--sweep {args.sweep} sizes its own fleets and mixes; drop {', '.join(given)}")
    if question and args.tpot_slo is not None:
        raise WaferError(f"--sweep {args.sweep} sets the TPOT SLO to 1 / --fast-speed; drop --tpot-slo")
    if not question and (args.mixes is not None or args.wafer_kw is not None or args.accelerator_kw is not None):
        raise WaferError("--mixes, --wafer-kw and --accelerator-kw go with --sweep question or sensitivity")
    if args.fast_speed is None:
        args.fast_speed = QUESTION_FAST_SPEED if question else 20.0
    if args.tpot_slo is None:
        args.tpot_slo = 1.0 / args.fast_speed if question else 0.1
    if args.requests is None:
        args.requests = QUESTION_REQUESTS if question else DEFAULT_REQUESTS
    if args.accelerator is None:
        args.accelerator = "h100,b200" if args.sweep == "question" else "h100"
    elif "," in args.accelerator and args.sweep != "question":
        raise WaferError("a comma list of accelerators goes with --sweep question only")


def _workload(args, rate: float | None = None):
    """The workload of the flags; `rate` (sweeps) overrides --rate, and rescales a trace to it."""
    from serve.workload import PROFILES, LengthDist, read_azure_trace, read_bench_report, synthetic
    if args.replay is not None:
        if args.trace is not None or rate is not None:
            raise WaferError("--replay replays one bench run as it was: no --trace, no --sweep")
        return read_bench_report(args.replay, args.replay_rate)
    if args.replay_rate is not None:
        raise WaferError("--replay-rate needs --replay")
    if args.trace is not None:
        w = read_azure_trace(args.trace, args.requests, args.time_scale)
        if rate is not None and w.span_s > 0:
            w = read_azure_trace(args.trace, args.requests, args.time_scale * (len(w) - 1) / w.span_s / rate)
        return w
    prof = PROFILES[args.profile]
    return synthetic(args.requests, rate or args.rate, args.input_len or prof.input_len, args.output_len or prof.output_len,
                     args.seed, args.burstiness, LengthDist(args.length_dist), name=args.profile)


def _policy(args):
    """The scheduler knobs: the flags', or with a measured cost file that records its server's
    policy (`wafer bench serve-costs`), that server's (what it is validated against)."""
    from bench.fleet import Policy
    from serve.costs import measured_policy
    from serve.events import Deadlines
    from serve.simulator import Router
    server = measured_policy(args.measured) if args.measured else None
    if server is None:
        return Policy(max_waiting=args.max_waiting or 4096, router=Router(args.router))
    try:
        return Policy(max_waiting=args.max_waiting or server["max_waiting"], max_prefill_batch=server["max_prefill_batch"],
                      max_prefill_tokens=server["max_prefill_tokens"], deadlines=Deadlines(**server["deadlines"]),
                      router=Router(args.router), max_prefilled=server["max_prefilled"])
    except (KeyError, TypeError, ValueError) as e:
        raise WaferError(f"measured cost file {args.measured}: scheduler {e}") from None


def _plan(args):
    from bench.fleet import disaggregated, integrated, measured
    from mesh.wafer import SPECS
    from model.config import preset
    from serve.costs import accelerator, link, load_measured, measured_policy, wafer_decode
    from serve.events import Mode

    policy = _policy(args)
    if args.measured:
        cost = load_measured(args.measured)
        server = measured_policy(args.measured) or {}
        return measured(cost, Mode(args.mode or server.get("mode", Mode.DISAGGREGATED.value)), args.units, policy)
    config, chip = preset(args.model), accelerator(args.accelerator)
    if args.integrated is not None:
        if args.prefill is not None or args.decode is not None:
            raise WaferError("--integrated excludes --prefill and --decode")
        return integrated(config, chip, args.integrated, args.context, args.chunked_prefill, args.mfu,
                          policy=policy, cost_h=args.prefill_cost_h)
    if (args.prefill is None) != (args.decode is None):
        raise WaferError("a disaggregated fleet needs both --prefill N --decode M (or neither, for the default)")
    if args.prefill is None:
        args.prefill, args.decode = DEFAULT_PREFILL, None
    if args.wafer not in SPECS:
        raise WaferError(f"unknown wafer {args.wafer!r}; known: {', '.join(SPECS)}")
    if args.decode is None:
        args.decode = DEFAULT_REPLICAS * wafer_decode(config, SPECS[args.wafer], args.grid, args.context, args.slots).wafers
    return disaggregated(config, chip, args.prefill, SPECS[args.wafer], args.grid, args.decode, link(args.link),
                         args.context, args.slots, args.mfu, policy, args.prefill_cost_h, args.decode_cost_h)


def _slo(args):
    from serve.simulator import SLO
    return SLO(args.ttft_slo, args.tpot_slo, args.fast_speed)


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def _format(s: dict) -> str:
    lines = [f"fleet       {json.dumps(s['fleet'])}",
             f"requests    {s['requests']:,} ({s['finished']:,} finished, failed {s['failed'] or 'none'}) "
             f"over {s['duration_s']:,.1f} s simulated",
             f"throughput  {s['throughput_req_s']:,.2f} req/s, {s['output_tokens_s']:,.0f} output tok/s",
             f"goodput     {s['goodput_req_s']:,.2f} req/s ({s['slo_attainment']:.1%} within both SLOs)",
             f"fast tokens {s['fast_tokens_s']:,.0f} tok/s served above the per-user speed",
             "latency ms  " + "  ".join(f"{name} p50 {_ms(s[key]['p50'])} p90 {_ms(s[key]['p90'])} "
                                        f"p99 {_ms(s[key]['p99'])}" for name, key in
                                        (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s"))),
             "utilisation " + ", ".join(f"{k} {v:.1%}" for k, v in s["utilisation"].items())
             + f"; mean decode batch {s['mean_decode_batch']:.1f}"]
    if "power_kw" in s:
        lines.append(f"power       {s['power_kw']:,.1f} kW: {s['goodput_req_s_per_kw']:.3f} good req/s per kW, "
                     f"{s['fast_tokens_s_per_kw']:,.1f} fast tok/s per kW")
    if "cost_per_h" in s:
        lines.append(f"cost        ${s['cost_per_h']:,.2f}/h: ${s['cost_per_1k_good_requests'] or float('nan'):.4f} "
                     f"per 1k good requests")
    lines.append(f"simulator   {s['events']:,} events in {s['wall_s']:.1f} s wall")
    return "\n".join(lines)


def _bar(total: int, disable: bool):
    return progress_bar(total, "req", disable=disable, mininterval=0.5)


def run(args) -> int:
    _defaults(args)
    if args.sweep in ("question", "sensitivity"):
        return _run_question(args)
    if args.sweep:
        return _run_sweep(args)
    from bench.fleet import report
    from serve.simulator import Router, simulate, simulate_parallel

    workload = _workload(args)
    plan = _plan(args)
    bar = _bar(len(workload), args.no_progress)
    start = time.perf_counter()
    last = [0]

    def tick(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    replay = args.replay is not None
    keep = replay or args.conditioning is not None
    if args.processes > 1:
        if plan.fleet.router is not Router.ROUND_ROBIN:
            raise WaferError("--processes needs --router round-robin (least-loaded routing couples the units)")
        result = simulate_parallel(plan.fleet, workload, _slo(args), args.processes, keep_records=keep)
    else:
        result = simulate(plan.fleet, workload, _slo(args), keep_records=keep, progress=tick)
    wall = time.perf_counter() - start
    bar.update(result.requests - last[0])
    bar.close()
    s = report(plan, result)
    s["workload"] = {"name": workload.name, "requests": len(workload), "span_s": workload.span_s}
    s["wall_s"] = wall
    if args.plot:
        from bench.fleet_plots import write_latency_plot
        s["plots"] = [write_latency_plot(result, args.plot)]
    text = None if args.json else _format(s)
    fleet, base = plan.fleet, result
    if replay:  # the run it replays, figure by figure
        s["replay"], more, calibrated = _compare_with_run(args, plan, workload, result)
        text = None if args.json else text + "\n" + more
        if calibrated is not None:  # the figures compared last: perturb those
            fleet, base = calibrated
    if args.conditioning is not None:
        s["conditioning"], more = _conditioning(args, fleet, workload, base)
        text = None if args.json else text + "\n" + more
    print(json.dumps(s) if args.json else text)
    return 0


def _conditioning(args, fleet, workload, base) -> tuple[dict, str]:
    from bench.sim_validation import conditioning, format_conditioning, simulated_figures
    jitter_s = args.jitter_ms / 1e3
    rows = conditioning(fleet, workload, _slo(args), simulated_figures(base.records, base.duration_s),
                        args.conditioning, jitter_s, args.cost_spread, args.seed)
    return ({"draws": args.conditioning, "jitter_ms": args.jitter_ms, "cost_spread": args.cost_spread, "rows": rows},
            format_conditioning(rows, args.conditioning, jitter_s, args.cost_spread))


def _compare_with_run(args, plan, workload, result) -> tuple[dict, str, tuple | None]:
    """The replayed run against the simulation, figure by figure, with the workers' level in each;
    with --calibrate, again with the costs scaled to the run's level. Returns (JSON, text, and with
    --calibrate the calibrated fleet and its result, else None)."""
    import dataclasses

    from bench.sim_validation import compare, format_comparison, format_levels, real_figures, simulated_figures, worker_levels
    from serve.simulator import simulate
    from serve.workload import bench_report_run
    run = bench_report_run(args.replay, args.replay_rate)
    real = real_figures(run)
    rows = compare(real, simulated_figures(result.records, result.duration_s))
    levels = worker_levels(run, result)
    out = {"report": args.replay, "rows": rows, "worker_levels": levels}
    text = format_comparison(rows) + ("\n" + format_levels(levels) if levels else "")
    if args.calibrate:
        if not levels:
            raise WaferError(f"--calibrate: {args.replay} has no worker times of the server (a `wafer bench serve` "
                             "report of a run against `wafer serve`)")
        scale = {key: levels[key]["ratio"] if key in levels else 1.0 for key in ("prefill_batch", "decode_step")}
        cost = plan.fleet.cost.scaled(prefill=scale["prefill_batch"], decode=scale["decode_step"])
        fleet = dataclasses.replace(plan.fleet, cost=cost)
        again = simulate(fleet, workload, _slo(args), keep_records=True)
        calibrated = compare(real, simulated_figures(again.records, again.duration_s))
        out["calibrated"] = {"scale": scale, "rows": calibrated, "worker_levels": worker_levels(run, again)}
        text += (f"\ncalibrated: prefill x{scale['prefill_batch']:.3f}, decode x{scale['decode_step']:.3f} "
                 "(the run's level)\n" + format_comparison(calibrated))
        return out, text, (fleet, again)
    return out, text, None


def _run_sweep(args) -> int:
    from bench.fleet import best_ratio, crossover
    from mesh.wafer import SPECS
    from model.config import preset
    from serve.costs import accelerator, link

    if args.power_kw is None:
        raise WaferError("--sweep needs --power-kw (the footprint to split)")
    if args.wafer not in SPECS:
        raise WaferError(f"unknown wafer {args.wafer!r}; known: {', '.join(SPECS)}")
    config, chip, spec = preset(args.model), accelerator(args.accelerator), SPECS[args.wafer]

    def note(row: dict) -> None:
        if not args.no_progress:
            progress(json.dumps(row))

    if args.sweep == "ratio":
        rows = best_ratio(config, chip, spec, args.grid, link(args.link), args.context, args.power_kw,
                          lambda rate: _workload(args, rate), args.rate, _slo(args), args.mfu, _policy(args), note)
    else:
        total = (args.input_len or 2048) + (args.output_len or 128)
        ratios = [1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0]
        rows = crossover(config, chip, spec, args.grid, link(args.link), args.context, args.power_kw,
                         args.requests, args.rate, total, ratios, _slo(args), args.seed, args.mfu, _policy(args), note)
    out = {"sweep": args.sweep, "power_kw": args.power_kw, "rows": rows}
    if args.plot:
        from bench.fleet_plots import write_sweep_plot
        out["plots"] = [write_sweep_plot(args.sweep, rows, args.plot)]
    if args.json:
        print(json.dumps(out))
    else:
        keys = list(rows[0]) if rows else []
        print("  ".join(keys))
        for r in rows:
            print("  ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    return 0


def _run_question(args) -> int:
    from bench.fleet_question import (MIXES, Assumptions, default_requests, question, question_jobs, sensitivity,
                                      sensitivity_jobs)
    from mesh.wafer import SPECS
    from model.config import preset
    from serve.costs import accelerator, link

    if args.power_kw is None:
        raise WaferError(f"--sweep {args.sweep} needs --power-kw (the footprint both fleets fill)")
    if args.wafer not in SPECS:
        raise WaferError(f"unknown wafer {args.wafer!r}; known: {', '.join(SPECS)}")
    mixes = [m.strip() for m in (args.mixes or ",".join(MIXES if args.sweep == "question" else ["chat"])).split(",")]
    for m in mixes:
        if m not in MIXES:
            raise WaferError(f"unknown mix {m!r}; known: {', '.join(MIXES)}")
    chips = [c.strip() for c in args.accelerator.split(",")]
    for c in chips:
        accelerator(c)
    link(args.link)
    if args.sweep == "sensitivity" and len(mixes) != 1:
        raise WaferError("--sweep sensitivity takes one mix")
    a = Assumptions(mfu=args.mfu, link=args.link, fast_speed=args.fast_speed, ttft_s=args.ttft_slo,
                    context=args.context, grid=args.grid, wafer_kw=args.wafer_kw or Assumptions.wafer_kw,
                    accelerator_kw=args.accelerator_kw, chunked=args.chunked_prefill)
    config, spec = preset(args.model), SPECS[args.wafer]
    bar = _bar(question_jobs(config, chips, mixes, a) if args.sweep == "question"
               else sensitivity_jobs(config, chips[0], a), args.no_progress)
    bar.unit = "unit"

    def note(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    start = time.perf_counter()
    if args.sweep == "question":
        out = question(config, spec, chips, mixes, args.power_kw, a, default_requests(args.requests), args.seed, note)
    else:
        out = sensitivity(config, spec, chips[0], mixes[0], args.power_kw, a, default_requests(args.requests),
                          args.seed, note)
    bar.total = bar.n  # the count above is exact for the question, close for the sensitivity
    bar.close()
    out["sweep"] = args.sweep
    out["wall_s"] = time.perf_counter() - start
    if args.plot:
        from bench.fleet_plots import write_question_plot, write_sensitivity_plot
        out["plots"] = [write_question_plot(out, args.plot) if args.sweep == "question"
                        else write_sensitivity_plot(out, args.plot)]
    print(json.dumps(out) if args.json else (_question_table(out) if args.sweep == "question"
                                              else _sensitivity_table(out)))
    return 0


def _x(r) -> str:
    return "integrated serves none" if r is None else f"{r:.3g}x"


def _per_kw(r: dict):
    i = r["integrated"]["per_mw"]["goodput_req_s"]
    return r["disaggregated"]["per_mw"]["goodput_req_s"] / i if i > 0 else None


def _question_table(out: dict) -> str:
    f = out["footprint"]
    lines = [f"{out['model']} on {out['wafer']}, {out['power_kw']:g} kW footprint ({f['unit']}): "
             + "; ".join(f"{k}: {v}" for k, v in f.items() if k != "unit"),
             f"SLOs: TTFT {out['assumptions']['ttft_s']:g} s, TPOT {1e3 / out['assumptions']['fast_speed']:g} ms "
             f"(fast = {out['assumptions']['fast_speed']:g} tok/s per user), {out['attainment']:.0%} attainment",
             "| accelerator | mix | disaggregated fleet | integrated fleet | goodput req/s disagg / integ | "
             "fast tok/s disagg / integ | goodput ratio | fast-token ratio | goodput ratio per kW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        d, i = r["disaggregated"], r["integrated"]
        lines.append(f"| {r['accelerator']} | {r['mix']} | {d['units']} x ({d['unit']}), {d['fleet_kw']:,.0f} kW | "
                     f"{i['units']} x ({i['unit']}), {i['fleet_kw']:,.0f} kW | "
                     f"{d['goodput_req_s']:,.1f} / {i['goodput_req_s']:,.1f} | "
                     f"{d['fast_tokens_s']:,.0f} / {i['fast_tokens_s']:,.0f} | {_x(r['goodput_ratio'])} | "
                     f"{_x(r['fast_tokens_ratio'])} | {_x(_per_kw(r))}"
                     + (" (a capacity is only a lower bound: capped)" if r.get("capped") else "") + " |")
    return "\n".join(lines)


def _sensitivity_table(out: dict) -> str:
    b = out["base"]
    lines = [f"{out['accelerator']}, {out['mix']}, {out['power_kw']:g} kW: base goodput ratio {_x(b['goodput_ratio'])}, "
             f"fast-token ratio {_x(b['fast_tokens_ratio'])} ({b['disaggregated']} vs {b['integrated']})",
             "| assumption (base) | moved to | goodput ratio | fast-token ratio | integrated unit |",
             "|---|---|---|---|---|"]
    for r in out["rows"]:
        for m in r["moves"]:
            if m["disaggregated_goodput_req_s"] == 0 and m["integrated_goodput_req_s"] == 0:
                lines.append(f"| {r['assumption']} | {m['value']} | neither serves | neither serves | - |")
                continue
            lines.append(f"| {r['assumption']} | {m['value']} | {_x(m['goodput_ratio'])} | "
                         f"{_x(m['fast_tokens_ratio'])} | {m['integrated'] if m['integrated_goodput_req_s'] > 0 else '-'} |")
    return "\n".join(lines)
