"""Where a decode step's time goes, from a profiler trace (SmolLM2-135M, f32, context 256, 128
steps): each XLA op of the decode programs, grouped (the CPU kernels by target and output shape,
XLA's fusions by kind), in ms per step, with the step time beside it.
Run under the bench lock: PYTHONPATH=$PWD python docs/decode/step_profile.py [batch]
(WAFER_CPU_KERNELS=xla profiles XLA's own ops instead of the CPU kernels.)"""
import collections, glob, gzip, json, os, re, sys, tempfile, numpy as np, jax
from model.load import load_model
from model.generate import Generator
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
STEPS = 128
L = load_model("smollm2-135m"); cfg = L.config
prompts = np.random.default_rng(0).integers(100, cfg.vocab_size - 100, size=(B, 256)).tolist()
g = Generator(L.params, cfg)
g.generate(prompts, STEPS + 1, stop_on_eos=False)  # compile
rates = [g.generate(prompts, STEPS + 1, stop_on_eos=False).tok_per_s for _ in range(3)]
# Decode programs' custom calls: instruction name -> what it is.
what = {}
for key in list(g._compiled._compiled):
    if key[0] != "chunk":
        continue
    for m in re.finditer(r"%?(\S+) = f32\[([\d,]+)\]\S* custom-call\(.*?custom_call_target=\"(\w+)\"",
                         g._compiled._compiled[key].as_text()):
        what[m.group(1)] = f"{m.group(3)} -> [{m.group(2)}]"
folder = tempfile.mkdtemp()
with jax.profiler.trace(folder, create_perfetto_trace=True):
    traced = g.generate(prompts, STEPS + 1, stop_on_eos=False)
trace = json.load(gzip.open(glob.glob(folder + "/**/*.trace.json.gz", recursive=True)[0]))
ms = collections.defaultdict(float)
calls = collections.Counter()
skip = ("$", "ThunkExecutor", "while", "CommonPjRt", "end:", "SlinkyThreadPool")
for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if e.get("ph") != "X" or e["name"].startswith(skip):
        continue
    name = what.get(e["name"], re.sub(r"\.\d+$", "", e["name"]))
    ms[name] += e["dur"] / 1e3 / STEPS
    calls[name] += 1
step_ms = 1e3 / traced.tok_per_s
print(f"batch {B}: {[round(r, 1) for r in rates]} tok/s untraced, traced step {step_ms:.2f} ms; "
      f"load {os.getloadavg()[0]:.2f}; CPU kernels {'off' if os.environ.get('WAFER_CPU_KERNELS') == 'xla' else 'on'}")
print("(ops of the prefill are included, divided over the steps: the few large ones)")
for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[:16]:
    print(f"  {t:7.3f} ms/step  {calls[name] / STEPS:6.1f} calls/step  {name}")
print(f"  {sum(ms.values()):7.3f} ms/step in ops; {step_ms - sum(ms.values()):.3f} ms/step between them")
