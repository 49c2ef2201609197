"""The single-step decoder of d0d146c against the chunked one, alternating in one process (batch 1).

First: git show d0d146c:model/generate.py > /tmp/df/old_generate.py
"""
import importlib.util
import os
import statistics
import sys
sys.path.insert(0, os.getcwd())
from model.load import load_model
from model.generate import Generator as New
spec = importlib.util.spec_from_file_location("old_generate", "/tmp/df/old_generate.py")
old = importlib.util.module_from_spec(spec); sys.modules["old_generate"] = old; spec.loader.exec_module(old)
from bench.decode import random_prompts
L = load_model("smollm2-135m")
p = random_prompts(1, 256, L.config.vocab_size, 0)
gens = {"old": old.Generator(L.params, L.config), "new16": New(L.params, L.config)}
for g in gens.values(): g.generate(p, 65, stop_on_eos=False)
rates = {k: [] for k in gens}
for _ in range(5):
    for k, g in gens.items(): rates[k].append(round(g.generate(p, 65, stop_on_eos=False).tok_per_s, 1))
print(os.getloadavg()[0], {k: (statistics.median(v), v) for k, v in rates.items()})
