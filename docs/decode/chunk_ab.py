"""Chunked decode against one dispatch per step: the same Generator with chunk=1 and chunk=16,
alternating, 5 timed runs each after a compile run, context 256, 64 steps; batch 1 and 8.

Run from the repository root: PYTHONPATH=$PWD flock /tmp/wafer-bench.lock python docs/decode/chunk_ab.py
"""
import json
import os
import statistics
from model.load import load_model
from model.generate import Generator
from bench.decode import random_prompts
L = load_model("smollm2-135m")
out = {"loadavg_start": os.getloadavg()[0]}
for B in (1, 8):
    prompts = random_prompts(B, 256, L.config.vocab_size, 0)
    gens = {c: Generator(L.params, L.config, chunk=c) for c in (1, 16)}
    for g in gens.values():
        g.generate(prompts, 65, stop_on_eos=False)  # compile + warm-up
    rates = {c: [] for c in gens}
    for _ in range(5):
        for c, g in gens.items():
            rates[c].append(g.generate(prompts, 65, stop_on_eos=False).tok_per_s)
    med = {c: statistics.median(r) for c, r in rates.items()}
    out[f"batch{B}"] = {"runs": rates, "median": med, "chunk16_over_chunk1": med[16] / med[1]}
    print(B, json.dumps(out[f"batch{B}"]), flush=True)
out["loadavg_end"] = os.getloadavg()[0]
print(json.dumps(out))
