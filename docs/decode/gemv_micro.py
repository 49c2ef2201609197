"""The decode step's GEMVs alone (SmolLM2-135M shapes, f32, random weights): 30 layers' worth of
QKV, O, gate|up and down products chained in one program, by XLA's dot ([K, N] and [N, K] weight
layouts) and by the CPU GEMV kernel (kernels/gemv_cpu.py; 1 and 2 threads), the LM head both
ways, and a 64 MB sum as the streaming bound of the same run. Prints ms and GB/s, medians of 15.
Run under the bench lock: PYTHONPATH=$PWD flock /tmp/wafer-bench.lock python docs/decode/gemv_micro.py [B]
(XLA_FLAGS in the environment apply to the XLA rows.)"""
import os, statistics, sys, time, numpy as np, jax, jax.numpy as jnp
from kernels import cpu_ffi, gemv_cpu
D, QKV, F, V, L = 576, 960, 1536, 49152, 30
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rng = np.random.default_rng(0)
w = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)
KN = [dict(qkv=w(D, QKV), o=w(D, D), gu=w(D, 2 * F), dn=w(F, D)) for _ in range(L)]
NK = [{k: jnp.asarray(np.ascontiguousarray(np.asarray(v).T)) for k, v in l.items()} for l in KN]
layer_bytes = sum(v.size * 4 for l in KN for v in l.values())
E = w(V, D)
def t(fn, *a, n=15):
    c = jax.jit(fn).lower(*a).compile(); jax.block_until_ready(c(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
def chain(P, x, mm):  # the model's shapes, not its exact dataflow
    for l in P:
        h = mm(x, l["qkv"])[:, :D] + mm(x, l["o"])
        g = mm(h, l["gu"])
        x = x + mm(g[:, :F], l["dn"]) * 1e-3
    return x
xla = lambda a, w: jnp.matmul(a, w, preferred_element_type=jnp.float32)
x = jnp.ones((B, D), jnp.float32)
res = {}
def row(name, seconds, nbytes):
    res[name] = (round(seconds * 1e3, 2), round(nbytes / seconds / 1e9, 1))
a = jnp.ones((64 << 20) // 4, jnp.float32)
row("sum 64MB (bound)", t(jnp.sum, a), a.size * 4)
row("layers XLA [K,N]", t(lambda P, x: chain(P, x, xla), KN, x), layer_bytes)
row("layers XLA [N,K]", t(lambda P, x: chain(P, x, lambda a, w: xla(a, w.T)), NK, x), layer_bytes)
row("head XLA x@E.T", t(lambda E, x: xla(x, E.T), E, x), E.size * 4)
if cpu_ffi.available():
    for th in (1, 2):
        row(f"layers kernel {th}t", t(lambda P, x: chain(P, x, lambda a, w: gemv_cpu.gemv(a, w, threads=th)), KN, x),
            layer_bytes)
        row(f"head kernel {th}t", t(lambda E, x: gemv_cpu.gemv(x, E, gemv_cpu.WLayout.NK, th), E, x), E.size * 4)
print(f"B={B} load={os.getloadavg()[0]:.2f} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (ms, GB/s):")
for k, v in res.items():
    print(f"  {k:22s} {v[0]:8.2f} ms {v[1]:6.1f} GB/s")
