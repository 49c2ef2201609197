"""Where a batch-1 decode step's time goes (SmolLM2, f32): the whole step, and its parts compiled alone
on the same weights: the 120 layer GEMVs chained (shapes of the model; not its exact dataflow) and
the LM head in three forms. Run under the bench lock: PYTHONPATH=$PWD python docs/decode/step_parts.py"""
import os, statistics, time, numpy as np, jax, jax.numpy as jnp
from model.load import load_model
from model.generate import Generator
from kernels.rmsnorm import rmsnorm_ref
L = load_model("smollm2-135m"); P = L.params; cfg = L.config
E = P["embed"]
x = jnp.ones((1, cfg.dim), jnp.float32)
def t(fn, *a, n=15):
    c = jax.jit(fn).lower(*a).compile(); c(*a)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
mm = lambda a, w: jnp.matmul(a, w, preferred_element_type=jnp.float32)
def gemvs(P, x):
    for l in P["layers"]:
        h = mm(x, l["w_qkv"])[:, :576] + mm(x, l["w_o"])
        g = mm(h, l["w_gate_up"])
        x = x + mm(g[:, :1536], l["w_down"])
    return x
res = {}
res["layer_gemvs_120"] = t(gemvs, P, x)
res["lm_head x@E.T"] = t(lambda E, x: jnp.argmax(mm(x, E.T)), E, x)
res["lm_head E@x"] = t(lambda E, x: jnp.argmax(mm(E, x[0])), E, x)
res["lm_head einsum"] = t(lambda E, x: jnp.argmax(jnp.einsum("vd,bd->bv", E, x)), E, x)
rng = np.random.default_rng(0)
p = rng.integers(100, cfg.vocab_size - 100, size=(1, 256)).tolist()
g = Generator(P, cfg); g.generate(p, 129, stop_on_eos=False)
res["step (generate, ms/tok)"] = statistics.median(1e3 / g.generate(p, 129, stop_on_eos=False).tok_per_s for _ in range(3))
wb = sum(a.size * 4 for a in jax.tree.leaves(P))
res["weights_MB"] = wb / 1e6
print(os.getloadavg()[0], {k: round(v, 2) for k, v in res.items()})
