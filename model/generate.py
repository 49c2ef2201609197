"""Single-device generation: prefill the prompts, then decode in chunks of steps, one compiled
program per chunk.

A chunk runs up to `DECODE_CHUNK` decode steps in one program (a loop on the device whose trip
count is an argument), donates the KV cache (updated in place), samples on device and returns
every step's tokens, so the host pays one dispatch per chunk, not per token, and still gets every
token. Each step's attention reads only about the filled part of the cache: a chunk gets the
cache cut to a bucketed length that covers every position it reaches (`attend_len_for`), grown
by one copy when the sequence crosses into the next bucket. Shapes are
bucketed (prompt length, cache length and attended length rounded up) so that nearby requests
reuse compiled code; compilation is done ahead of time and reported separately from the timed
work.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi
from kernels.sampling import sample_ref
from mesh.errors import WaferError
from mesh.extent import round_up
from model.cache import KVCache, empty_cache
from model.compile_cache import CompileCache
from model.config import ModelConfig
from model.forward import forward
from model.sampling import Sampling, sampling_keys, sampling_knobs
from model.weights import Params, pack_block_weights, params_dtype

# Prompt and cache lengths are rounded up to these multiples: fewer distinct compiled shapes,
# and a cache only slightly longer than needed (decode attention reads the whole cache).
PROMPT_BUCKET = 32
CACHE_BUCKET = 64
# Decode steps one compiled program runs at most (one dispatch and one host read per chunk). A
# sequence that stops at EOS mid-chunk costs the rest of that chunk and the next one (dispatched
# before this one's tokens are read); its tokens after EOS are dropped.
DECODE_CHUNK = 16
# A cache of S positions is decoded in prefixes that are multiples of S / ATTEND_SPLITS (at least
# ATTEND_MIN_BUCKET): a step reads at most that many cache positions it does not need, one cache
# length compiles at most ATTEND_SPLITS decode programs, and the cache is copied (grown) at most
# ATTEND_SPLITS times per request. Below the minimum, the unneeded positions cost less than a
# compile (SmolLM2: 512 positions of cache are 23.6 MB against 538 MB of weights per step).
ATTEND_SPLITS = 8
ATTEND_MIN_BUCKET = 512


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (EOS included when it was produced)
    ttft_s: float  # prefill + first token, compiled code only
    decode_s: float  # wall time of the decode steps after the first token
    decode_steps: int  # decode steps run (each yields one token per sequence)
    compile_s: float  # compilation done by this call (0 when everything was cached)

    @property
    def tok_per_s(self) -> float:
        """Decode rate per sequence after compilation; 0 when no decode step ran."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


def cache_len_for(longest_prompt: int, max_new_tokens: int) -> int:
    """Cache positions S the generator allocates (and decode attention reads) for a request."""
    return round_up(max(round_up(longest_prompt, PROMPT_BUCKET), longest_prompt + max_new_tokens), CACHE_BUCKET)


def attend_len_for(cache_len: int, last_pos: int) -> int:
    """Cache positions a decode chunk holds (and attends over) when its last step writes position
    `last_pos`: a multiple of the attention bucket (or all `cache_len`) past last_pos."""
    bucket = max(ATTEND_MIN_BUCKET, round_up(-(-cache_len // ATTEND_SPLITS), CACHE_BUCKET))
    return min(cache_len, round_up(last_pos + 1, bucket))


def chunk_schedule(cache_len: int, longest: int, max_new_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(steps, cache positions held) of each decode chunk, in decode_loop's order (an early stop
    runs a prefix of it), for sequences of at most `longest` prompt tokens in a cache of
    `cache_len`: chunk i holds the cache cut to `attend_len_for` its last position."""
    last, schedule = longest - 1, []
    for done in range(0, max_new_tokens - 1, chunk):
        n = min(chunk, max_new_tokens - 1 - done)
        last += n
        schedule.append((n, attend_len_for(cache_len, last)))
    return schedule


def resize_cache(cache: KVCache, max_len: int) -> KVCache:
    """`cache` cut to its first `max_len` positions, or padded with zeros to `max_len`."""
    def resize(a):
        S = a.shape[2]
        return a[:, :, :max_len] if max_len <= S else jnp.pad(a, ((0, 0), (0, 0), (0, max_len - S), (0, 0)))
    return jax.tree.map(resize, cache)


def _select(logits_BV, pos_B, temperature, top_k, top_p, key, greedy):
    return sample_ref(logits_BV, sampling_keys(key, pos_B), temperature, top_k, top_p, greedy)


def _prefill(params, tokens_BT, lengths_B, cache, temperature, top_k, top_p, key, *, config, greedy):
    B = tokens_BT.shape[0]
    logits_BV, cache = forward(params, config, tokens_BT, jnp.zeros((B,), jnp.int32), lengths_B - 1, cache)
    first_B = _select(logits_BV, lengths_B, temperature, top_k, top_p, key, greedy)
    return first_B, logits_BV, cache


def _decode_chunk(params, cache, tokens_B, pos_B, n, temperature, top_k, top_p, key, *, config, greedy,
                  max_steps):
    """`n` (<= max_steps, traced) decode steps in one program; returns their tokens [max_steps, B]
    (rows past n unused), the last tokens and positions, and the cache.

    The steps attend over the whole cache they are given: the caller passes a cache cut to the
    positions the chunk needs (`resize_cache`). Attending over a slice of a longer cache instead
    made XLA on CPU copy every layer's cache twice per step inside the loop.
    """
    def step(i, carry):
        tok_B, p_B, kv, out_KB = carry
        logits_BV, kv = forward(params, config, tok_B[:, None], p_B, jnp.zeros_like(p_B), kv)
        next_B = _select(logits_BV, p_B + 1, temperature, top_k, top_p, key, greedy)
        return next_B, p_B + 1, kv, jax.lax.dynamic_update_index_in_dim(out_KB, next_B, i, 0)

    out_KB = jnp.zeros((max_steps,) + tokens_B.shape, jnp.int32)
    tokens_B, pos_B, cache, out_KB = jax.lax.fori_loop(0, n, step, (tokens_B, pos_B, cache, out_KB))
    return out_KB, tokens_B, pos_B, cache


@dataclasses.dataclass
class DevicePrefill:
    """A prefill on one device: the first tokens and the cache, both still on the device."""

    first_B: jax.Array  # [B] int32: the first generated token of each prompt
    cache: KVCache  # L layers of [B, K, S, H]
    seconds: float  # the compiled prefill, from dispatch to first tokens ready
    compile_s: float  # compilation done by this call


class Generator:
    """Generates from one model on the default device, caching compiled code per shape."""

    def __init__(self, params: Params, config: ModelConfig, chunk: int = DECODE_CHUNK, panels: bool | None = None):
        """`chunk`: decode steps per compiled program (1: a dispatch per token).

        `panels`: hold the block matrices packed for the CPU panel kernel (model/weights.py
        `pack_block_weights`; faster at batch > 1, a packed copy beside the caller's weights);
        default: `WAFER_CPU_KERNELS=panels`. Ignored unless the CPU kernels run here."""
        if chunk < 1:
            raise WaferError(f"decode chunk must be at least 1 step, got {chunk}")
        if panels is None:
            panels = cpu_ffi.panels_requested()
        self.panels = panels and jax.default_backend() == "cpu" and cpu_ffi.available()
        self.params = pack_block_weights(params) if self.panels else params
        self.config = config
        self.dtype = params_dtype(params)  # of the weights, the activations and the cache
        self.chunk = chunk
        self._compiled = CompileCache()

    def prefill(self, prompts: list[list[int]], cache_len: int, sampling: Sampling) -> DevicePrefill:
        """Prefill `prompts` into a fresh cache of `cache_len` positions."""
        cfg = self.config
        B = len(prompts)
        longest = max(len(p) for p in prompts)
        T = round_up(longest, PROMPT_BUCKET)
        S = max(cache_len, T)
        tokens_BT = np.zeros((B, T), np.int32)
        for b, p in enumerate(prompts):
            tokens_BT[b, : len(p)] = p
        lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
        knobs = sampling_knobs(sampling)
        cache = empty_cache(cfg.n_layers, B, cfg.n_kv_heads, S, cfg.head_dim, self.dtype)
        prefill = jax.jit(functools.partial(_prefill, config=cfg, greedy=sampling.greedy), donate_argnums=(3,))
        prefill_c, compile_s = self._compiled.get(("prefill", B, T, S, sampling.greedy), prefill,
                                             self.params, tokens_BT, lengths_B, cache, *knobs)
        t0 = time.perf_counter()
        tok_B, _, cache = prefill_c(self.params, jnp.asarray(tokens_BT), lengths_B, cache, *knobs)
        tok_B.block_until_ready()
        return DevicePrefill(tok_B, cache, time.perf_counter() - t0, compile_s)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_on_eos: bool = True) -> GenerationResult:
        """Generate up to `max_new_tokens` for each prompt (a batch decodes in lockstep)."""
        cfg = self.config
        check_request(cfg, prompts, max_new_tokens)
        longest = max(len(p) for p in prompts)
        S = cache_len_for(longest, max_new_tokens)
        pre = self.prefill(prompts, S, sampling)
        return self.continue_from(pre.first_B, pre.cache, [len(p) for p in prompts], max_new_tokens, sampling,
                                  stop_on_eos, pre.seconds, pre.compile_s)

    def continue_from(self, first_B, cache: KVCache, lengths: list[int], max_new_tokens: int,
                      sampling: Sampling = Sampling(), stop_on_eos: bool = True, prefill_s: float = 0.0,
                      prefill_compile_s: float = 0.0) -> GenerationResult:
        """Decode after a prefill done elsewhere (e.g. on a prefill mesh).

        Args:
          first_B: [B] the first generated token of each sequence (sampled by the prefill).
          cache: the prefilled cache, [B, K, S, H] per layer, S >= length + max_new_tokens.
          lengths: prompt length of each sequence (the first token's position).
        """
        cfg = self.config
        if max(lengths) + max_new_tokens > cfg.max_seq_len:
            raise WaferError(f"prompt ({max(lengths)} tokens) + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {cfg.max_seq_len}")
        if max(lengths) + max_new_tokens > cache.max_len:
            raise WaferError(f"prompt ({max(lengths)}) + {max_new_tokens} new tokens exceeds the cache of "
                             f"{cache.max_len} positions")
        knobs = sampling_knobs(sampling)
        lengths_B = jnp.asarray(lengths, jnp.int32)
        tok_B = jnp.asarray(first_B, jnp.int32)
        S, chunk = cache.max_len, self.chunk
        compile_s = [prefill_compile_s]

        def compiled(key, fn, *args):
            program, seconds = self._compiled.get(key, fn, *args)
            compile_s[0] += seconds
            return program

        lens = [cut for _, cut in chunk_schedule(S, max(lengths), max_new_tokens, chunk)]
        B = cache.batch
        programs, resizes = {}, {}
        for cut, prev in zip(lens, [S] + lens):
            shape = lambda n: jax.ShapeDtypeStruct((B, cfg.n_kv_heads, n, cfg.head_dim), cache.k_LBKSH[0].dtype)
            kv = KVCache(*(tuple(shape(cut) for _ in range(cfg.n_layers)),) * 2)
            if cut not in programs:
                fn = jax.jit(functools.partial(_decode_chunk, config=cfg, greedy=sampling.greedy, max_steps=chunk),
                             donate_argnums=(1,))
                programs[cut] = compiled(("chunk", B, cut, chunk, sampling.greedy), fn, self.params, kv, lengths_B,
                                         lengths_B, jnp.int32(chunk), *knobs)
            if cut != prev and (prev, cut) not in resizes:
                old = KVCache(*(tuple(shape(prev) for _ in range(cfg.n_layers)),) * 2)
                resizes[prev, cut] = compiled(("resize", B, prev, cut),
                                              jax.jit(functools.partial(resize_cache, max_len=cut)), old)
        state = {"tok": tok_B, "pos": lengths_B, "cache": cache, "chunk": 0}

        def dispatch_chunk(n):
            cut = lens[state["chunk"]]
            state["chunk"] += 1
            if state["cache"].max_len != cut:  # a copy of the cache, once per attention bucket
                state["cache"] = resizes[state["cache"].max_len, cut](state["cache"])
            out_KB, state["tok"], state["pos"], state["cache"] = programs[cut](
                self.params, state["cache"], state["tok"], state["pos"], jnp.int32(n), *knobs)
            return out_KB

        t0 = time.perf_counter()
        first = np.asarray(tok_B)
        ttft = prefill_s + time.perf_counter() - t0
        eos = set(cfg.eos_token_ids) if stop_on_eos else set()
        run = decode_loop(dispatch_chunk, first, max_new_tokens, eos, chunk=chunk)
        return GenerationResult(run.tokens, ttft, run.seconds, run.steps, compile_s[0])


def check_request(config: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse a generation request that cannot run, with the reason."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise WaferError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise WaferError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise WaferError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise WaferError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds the "
                         f"model's context of {config.max_seq_len}")


@dataclasses.dataclass
class DecodeRun:
    """What the host decode loop did."""

    tokens: list[list[int]]  # generated ids per sequence, the first (prefilled) token included
    steps: int  # decode steps dispatched
    seconds: float  # wall time of the loop


def decode_loop(dispatch_step, first: np.ndarray, max_new_tokens: int, eos: set[int],
                read_tokens=np.asarray, chunk: int | None = None) -> DecodeRun:
    """Host loop shared by every decoder.

    Without `chunk`, `dispatch_step()` launches one decode step and returns its tokens [B] (on
    device); with `chunk`, `dispatch_step(n)` launches n <= chunk steps and returns their tokens
    [>= n, B] (rows past n are ignored). `read_tokens` turns them into a host array. The next dispatch is made before the
    previous one's tokens are read, so the host read overlaps device work; a sequence that hits
    EOS costs at most one wasted dispatch (and the rest of its own).
    """
    out = [[int(t)] for t in first]
    done = [int(t) in eos for t in first]

    def consume(tokens, n):
        rows = read_tokens(tokens)
        for tokens_B in (rows[:n] if chunk is not None else [rows]):
            for b, t in enumerate(tokens_B):
                if not done[b]:
                    out[b].append(int(t))
                    done[b] = int(t) in eos

    steps, pending = 0, None
    t0 = time.perf_counter()
    while steps < max_new_tokens - 1 and not all(done):
        if chunk is None:
            tokens, n = dispatch_step(), 1
        else:
            n = min(chunk, max_new_tokens - 1 - steps)
            tokens = dispatch_step(n)
        steps += n
        if pending is not None:
            consume(*pending)
        pending = tokens, n
    if pending is not None:
        consume(*pending)
    return DecodeRun(out, steps, time.perf_counter() - t0)
