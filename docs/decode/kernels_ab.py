"""The CPU kernels (kernels/gemv_cpu.py, kernels/decode_attention_cpu.py) against XLA's own ops:
Generators on the same weights, one compiled with the kernels, one without, and one with the
kernels and its block weights packed into column panels (`Generator(panels=True)`, the panel
kernel), alternating, 5 timed runs each after a compile run, context 256, 128 steps; batch 1 and 8.
Same-run ratios, so they survive a loaded machine better than either figure alone.

Run from the repository root: PYTHONPATH=$PWD flock /tmp/wafer-bench.lock python docs/decode/kernels_ab.py [batches]
"""
import json
import os
import statistics
import sys
from kernels import cpu_ffi
from model.load import load_model
from model.generate import Generator
from bench.decode import random_prompts
assert cpu_ffi.available(), "the CPU kernels did not build: nothing to compare"
L = load_model("smollm2-135m")
out = {"loadavg_start": os.getloadavg()[0]}
for B in [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]:
    prompts = random_prompts(B, 256, L.config.vocab_size, 0)
    gens = {}
    for name, on in (("kernels", True), ("xla", False), ("panels", True)):
        cpu_ffi.available.cache_clear()
        if not on:
            os.environ["WAFER_CPU_KERNELS"] = "xla"
        gens[name] = Generator(L.params, L.config, panels=name == "panels")
        gens[name].generate(prompts, 129, stop_on_eos=False)  # compile (with the choice of this moment) + warm-up
        os.environ.pop("WAFER_CPU_KERNELS", None)
    cpu_ffi.available.cache_clear()
    rates = {n: [] for n in gens}
    tokens = {}
    for _ in range(5):
        for n, g in gens.items():
            r = g.generate(prompts, 129, stop_on_eos=False)
            rates[n].append(round(r.tok_per_s, 2))
            tokens[n] = r.tokens
    med = {n: statistics.median(r) for n, r in rates.items()}
    out[f"batch{B}"] = {"runs": rates, "median": med, "kernels_over_xla": round(med["kernels"] / med["xla"], 3),
                        "panels_over_kernels": round(med["panels"] / med["kernels"], 3),
                        "same_tokens": tokens["kernels"] == tokens["xla"] == tokens["panels"]}
    print(B, json.dumps(out[f"batch{B}"]), flush=True)
out["loadavg_end"] = os.getloadavg()[0]
print(json.dumps(out))
