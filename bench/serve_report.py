"""`wafer bench serve` reports for a terminal: one run in vLLM's layout, a sweep as one line per
rate, and several saved reports (`--compare`) side by side."""

from __future__ import annotations

import json

from bench.table import Row, aligned
from mesh.errors import WaferError

METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _rate(r) -> str:
    return "inf" if r == "inf" else f"{r:g}"


def _stats(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"mean {s['mean']:.1f}  median {s['median']:.1f}  p90 {s['p90']:.1f}  p99 {s['p99']:.1f}"


def _slos(slos: dict) -> str:
    names = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E"}
    return ", ".join(f"{names[k]} <= {v:g} ms" for k, v in slos.items())


def _errors(run: dict) -> str:
    return "; ".join(f"{n} x {msg}" for msg, n in run["errors"].items())


def _head_rows(r: dict) -> list[Row]:
    p = r["profile"]
    if all(run["rate"] == "inf" for run in r["runs"]):
        arrivals = "all at once"
    else:
        arrivals = "Poisson" if r["burstiness"] == 1 else f"gamma, burstiness {r['burstiness']:g}"
    return [
        Row("target", f"{r['url']}  model {r['model']}" + (f"  [{r['label']}]" if r["label"] else "")),
        Row("workload", f"{p['name']}: {r['requests']} requests of {p['input_len']} in / {p['output_len']} out "
                        f"tokens" + (f" (+-{p['spread']:.0%})" if p["spread"] else "") + f", seed {r['seed']}"),
        Row("arrivals", arrivals + (f", at most {r['max_concurrency']} in flight" if r["max_concurrency"] else "")),
    ]


def _run_rows(run: dict, slos: dict) -> list[Row]:
    rows = [
        Row("rate", f"{_rate(run['rate'])} req/s: {run['completed']} of {run['requests']} completed, "
                    f"{run['failed']} failed, in {run['duration_s']:.2f} s"),
        Row("throughput", f"{run['request_throughput']:.3f} req/s, {run['output_throughput']:.1f} output tok/s, "
                          f"{run['total_token_throughput']:.1f} tok/s in all"),
    ]
    rows += [Row(f"{name} ms", _stats(run[key])) for key, name in METRICS]
    if slos:
        rows.append(Row("goodput", f"{run['goodput']:.3f} req/s ({run['slo_attainment']:.0%} of requests within "
                                   f"{_slos(slos)})"))
    if run.get("sustained") is False:
        rows.append(Row("warning", _burst_note(run)))
    if run["failed"]:
        rows.append(Row("errors", _errors(run)))
    if run["short_outputs"] or run["prompt_len_mismatches"]:
        rows.append(Row("lengths", f"{run['short_outputs']} requests got fewer tokens than asked, "
                                   f"{run['prompt_len_mismatches']} prompts counted differently by the server"))
    return rows


def _burst_note(run: dict) -> str:
    return (f"the arrivals spanned {run['arrival_window_s']:.1f} s, less than the median request "
            f"({run['e2e_ms']['median'] / 1e3:.1f} s): a burst, not a sustained rate; raise --requests")


def _sweep_line(run: dict, slos: dict) -> str:
    def p(key, q):
        s = run[key]
        return f"{s[q]:9.1f}" if s else f"{'-':>9}"

    good = f"{run['goodput']:8.3f} {run['slo_attainment']:6.0%}" if slos else ""
    return (f"{run['completed']:>4}/{run['requests']:<4} {run['request_throughput']:8.3f} "
            f"{run['output_throughput']:9.1f} {p('ttft_ms', 'median')} {p('ttft_ms', 'p99')} "
            f"{p('tpot_ms', 'median')} {p('tpot_ms', 'p99')} {p('itl_ms', 'p99')} {p('e2e_ms', 'median')} {good}")


SWEEP_HEADER = (f"{'ok/sent':<9} {'req/s':>8} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
                f"{'TPOT p99':>9} {'ITL p99':>9} {'E2E p50':>9}")


def _max_rate_rows(r: dict) -> list[Row]:
    rows = []
    if "search" in r:
        s = r["search"]
        probes = ", ".join(f"{p['rate']:g} -> {p['attainment']:.0%}" for p in s["probes"])
        at_least = "at least " if s["max_rate"] == s["hi"] else ""  # the top of the range held: the knee is above
        best = (f"{at_least}{s['max_rate']:g} req/s, {s['max_rate_per_cpu']:g} req/s per CPU ({r['cpus']} CPUs)"
                if s["max_rate"] is not None else f"below {s['lo']:g} req/s")
        rows.append(Row("max rate", f"{best}: highest measured rate with >= {s['target_attainment']:.0%} of "
                                    f"requests within the SLOs (probes {probes})"))
        if s.get("bursts"):
            rows.append(Row("warning", f"the probes at {', '.join(f'{x:g}' for x in s['bursts'])} req/s ended their "
                                       f"arrivals before a median request finished: bursts, so the max rate may be "
                                       f"overstated; raise --requests"))
    if "sweep_max_rate" in r:
        s = r["sweep_max_rate"]
        best = (f"{s['max_rate']:g} req/s, {s['max_rate_per_cpu']:g} req/s per CPU ({r['cpus']} CPUs)"
                if s["max_rate"] is not None else "none of the swept rates")
        rows.append(Row("max rate", f"{best}: highest swept rate with >= {s['target_attainment']:.0%} of requests "
                                    f"within the SLOs (a sweep, not a search)"))
    return rows


def format_table(r: dict) -> str:
    """The report as aligned `label  value` lines (latencies in ms)."""
    rows = _head_rows(r)
    if r["slos"]:
        rows.append(Row("SLOs", _slos(r["slos"])))
    if len(r["runs"]) == 1:
        rows += _run_rows(r["runs"][0], r["slos"])
    else:
        rows.append(Row("rate req/s", SWEEP_HEADER + (f" {'goodput':>8} {'in SLO':>6}" if r["slos"] else "")))
        rows += [Row(f"{_rate(run['rate'])}", _sweep_line(run, r["slos"])) for run in r["runs"]]
        rows += [Row(f"errors @ {_rate(run['rate'])}", _errors(run)) for run in r["runs"] if run["failed"]]
        rows += [Row(f"warning @ {_rate(run['rate'])}", _burst_note(run)) for run in r["runs"]
                 if run.get("sustained") is False]
    rows += _max_rate_rows(r)
    env = r["env"]
    rows.append(Row("client", f"{env['client_cpus']} CPUs, python {env['python']}, aiohttp {env['aiohttp']}"
                              + (f", load average {env['loadavg_1m_start']} -> {env['loadavg_1m_end']}"
                                 if "loadavg_1m_start" in env else "")))
    return aligned(rows)


def load_reports(paths: list[str]) -> list[dict]:
    """Saved `--json` reports; each gets a label (its own, else its file name)."""
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                r = json.load(f)
        except OSError as e:
            raise WaferError(f"--compare {path}: {e.strerror}") from None
        except ValueError:
            raise WaferError(f"--compare {path}: not a JSON report of wafer bench serve") from None
        if not isinstance(r, dict) or "runs" not in r or "profile" not in r:
            raise WaferError(f"--compare {path}: not a JSON report of wafer bench serve")
        label = r.get("label") or path.rsplit("/", 1)[-1].removesuffix(".json")
        taken = {x["label"] for x in reports}
        r["label"] = label if label not in taken else f"{label} ({len(reports) + 1})"
        reports.append(r)
    return reports


def format_compare(reports: list[dict]) -> str:
    """Several reports, one line per (label, rate), ordered by rate then label."""
    slos = any(r["slos"] for r in reports)
    width = max(len(r["label"]) for r in reports)
    lines = [(r["label"], run) for r in reports for run in r["runs"]]
    lines.sort(key=lambda x: (float("inf") if x[1]["rate"] == "inf" else x[1]["rate"], x[0]))
    rows = [Row("rate req/s", f"{'label':<{width}} " + SWEEP_HEADER + (f" {'goodput':>8} {'in SLO':>6}" if slos else ""))]
    slos_of = {r["label"]: r["slos"] for r in reports}
    rows += [Row(_rate(run["rate"]), f"{label:<{width}} " + _sweep_line(run, slos_of[label])) for label, run in lines]
    for r in reports:
        rows += [Row(f"{r['label']}", row.value) for row in _max_rate_rows(r)]
        rows.append(Row(f"{r['label']}", f"{r['profile']['name']} {r['profile']['input_len']}/"
                                         f"{r['profile']['output_len']} tokens, {r['requests']} requests, "
                                         f"{r['url']} model {r['model']}"))
    return aligned(rows)
