"""llama.cpp (through llama-cpp-python) on the same weights: the CPU program a user would pick instead.

The GGUF we load (SmolLM2's Q4_1) is converted by llama.cpp's own quantize call into float32 and
float16 files (`allow_requantize`: Q4_1 -> f32 is exact, every Q4_1 value is a float32), cached
next to our converted weights. llama.cpp then decodes one sequence greedily on `threads` threads:
the prompt is evaluated once (prefill, untimed), then each timed step evaluates one token and
takes the argmax of its logits, as our greedy decoder does.

llama-cpp-python is an optional extra (`peers`), never a test dependency: it compiles llama.cpp.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

from mesh.errors import WaferError

INSTALL_HINT = "pip install -e '.[peers]'"
# llama.cpp's file types (enum llama_ftype) for the precisions the comparison runs.
FTYPES = {"f32": 0, "f16": 1}


_quiet_log = None  # llama.cpp's log callback, kept alive while llama.cpp may call it


def import_llama_cpp():
    """The llama_cpp module, with llama.cpp's own logging off (it prints every tensor it converts
    or loads), or a one-line error that says how to install it."""
    global _quiet_log
    try:
        import llama_cpp
    except ImportError:
        raise WaferError(f"--compare-llamacpp needs llama-cpp-python: {INSTALL_HINT}") from None
    if _quiet_log is None and hasattr(llama_cpp, "llama_log_callback"):
        _quiet_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_quiet_log, None)
    return llama_cpp


def converted_gguf(source: str, precision: str, cache_dir: str) -> str:
    """`source` (a .gguf file) converted to `precision` by llama.cpp's quantize, cached in `cache_dir`
    under a name keyed by the source's size and modification time."""
    if not source.endswith(".gguf"):
        raise WaferError(f"--compare-llamacpp needs a .gguf model, got {source}")
    llama_cpp = import_llama_cpp()
    st = os.stat(source)
    stem = os.path.splitext(os.path.basename(source))[0]
    out = os.path.join(cache_dir, "llamacpp", f"{stem}-{st.st_size}-{int(st.st_mtime)}-{precision}.gguf")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[precision]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out + ".part"
    if llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), params) != 0:
        raise WaferError(f"llama.cpp could not convert {source} to {precision}")
    os.replace(tmp, out)
    return out


@dataclasses.dataclass
class LlamaCppResult:
    precision: str
    tok_per_s: float  # median over repeats
    runs_tok_per_s: list[float]
    tokens: list[int]  # the greedy tokens of the last run, the first (after the prefill) included
    threads: int
    version: str


def time_llamacpp(path: str, precision: str, prompt: list[int], steps: int, repeats: int,
                  threads: int) -> LlamaCppResult:
    """Greedy decode of `steps` steps after the first token of `prompt`, `repeats` timed runs
    after one warm-up run; the median tok/s."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + steps + 1, n_batch=max(len(prompt), 32),
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def run() -> tuple[float, list[int]]:
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(prompt)
        tokens = [argmax()]
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return steps / (time.perf_counter() - t0), tokens

    run()  # warm-up: thread pool, page faults of the weights
    runs = [run() for _ in range(repeats)]
    rates = [r for r, _ in runs]
    llm.close()
    return LlamaCppResult(precision, statistics.median(rates), rates, runs[-1][1], threads,
                          getattr(llama_cpp, "__version__", "?"))
