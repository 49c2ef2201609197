"""Batch-1 decode of one commit against a fixed reference commit, back to back (a ratio that
survives load). Used to bisect the batch-1 decode regression (issue 15).

    flock /tmp/wafer-bench.lock python docs/decode/bisect_time.py CANDIDATE [--ref df48612]

Each commit is checked out in a scratch worktree (/work/wt/bis-<hash>, kept for reuse; remove with
`git worktree remove`), and timed in its own process through the API every commit since the
reference has: model.load.load_model and model.generate.Generator(params, config).generate.
Processes alternate ref, candidate, ref, candidate; each warms up (compiles) and then times
`--repeats` greedy runs of `--steps` decode steps after a `--context`-token random prompt.
Prints one JSON line: the medians, every run, the ratio candidate / reference and the load.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, os, sys, numpy as np
from model.load import load_model
from model.generate import Generator
context, steps, repeats = map(int, sys.argv[1:4])
L = load_model("smollm2-135m")
rng = np.random.default_rng(0)
prompts = rng.integers(100, L.config.vocab_size - 100, size=(1, context)).tolist()
g = Generator(L.params, L.config)
g.generate(prompts, steps + 1, stop_on_eos=False)
runs = [g.generate(prompts, steps + 1, stop_on_eos=False) for _ in range(repeats)]
print("RESULT", json.dumps({"rates": [r.tok_per_s for r in runs], "tokens": runs[-1].tokens[0][:16]}))
"""


def worktree(repo: str, commit: str) -> str:
    sha = subprocess.check_output(["git", "-C", repo, "rev-parse", commit], text=True).strip()
    path = f"/work/wt/bis-{sha[:10]}"
    if not os.path.isdir(path):
        subprocess.check_call(["git", "-C", repo, "worktree", "add", "--detach", path, sha],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def time_commit(path: str, args, extra_env=()) -> dict:
    env = dict(os.environ, PYTHONPATH=path, **dict(kv.split("=", 1) for kv in extra_env))
    out = subprocess.run([sys.executable, "-c", WORKER, str(args.context), str(args.steps), str(args.repeats)],
                         cwd=path, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{path}: no result\n{out.stderr[-2000:]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("candidate", help="a commit, or a directory (a work tree to time as it is)")
    p.add_argument("--ref", default="df48612")
    p.add_argument("--repo", default=os.getcwd())
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="ref/candidate process pairs")
    p.add_argument("--cand-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the candidate's processes only (e.g. XLA_FLAGS=...)")
    args = p.parse_args()
    cand = args.candidate if os.path.isdir(args.candidate) else worktree(args.repo, args.candidate)
    ref = args.ref if os.path.isdir(args.ref) else worktree(args.repo, args.ref)
    load = [round(os.getloadavg()[0], 2)]
    rates = {"ref": [], "cand": []}
    tokens = {}
    for _ in range(args.rounds):
        for name, path, extra in (("ref", ref, ()), ("cand", cand, args.cand_env)):
            r = time_commit(path, args, extra)
            rates[name] += [round(x, 2) for x in r["rates"]]
            tokens[name] = r["tokens"]
    load.append(round(os.getloadavg()[0], 2))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"candidate": args.candidate, "cand_env": args.cand_env, "ref": args.ref, "ref_tok_s": med["ref"],
                      "cand_tok_s": med["cand"], "ratio": round(med["cand"] / med["ref"], 3),
                      "runs": rates, "same_tokens": tokens["ref"] == tokens["cand"], "load_1m": load}))


if __name__ == "__main__":
    main()
