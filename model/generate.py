"""Single-device generation: prefill the prompts, then a jitted decode step per token.

The decode step donates the KV cache (updated in place), samples on device, and returns the next
tokens and positions, so the host loop only dispatches and reads token ids. Shapes are bucketed
(prompt length and cache length rounded up) so that nearby requests reuse compiled code;
compilation is done ahead of time and reported separately from the timed work.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sampling import sample_ref
from mesh.errors import WaferError
from mesh.extent import round_up
from model.cache import KVCache, empty_cache
from model.compile_cache import CompileCache
from model.config import ModelConfig
from model.forward import forward
from model.sampling import Sampling, sampling_keys, sampling_knobs
from model.weights import Params, params_dtype

# Prompt and cache lengths are rounded up to these multiples: fewer distinct compiled shapes,
# and a cache only slightly longer than needed (decode attention reads the whole cache).
PROMPT_BUCKET = 32
CACHE_BUCKET = 64


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


def _select(logits_BV, pos_B, temperature, top_k, top_p, key, greedy):
    return sample_ref(logits_BV, sampling_keys(key, pos_B), temperature, top_k, top_p, greedy)


def _prefill(params, tokens_BT, lengths_B, cache, temperature, top_k, top_p, key, *, config, greedy):
    B = tokens_BT.shape[0]
    logits_BV, cache = forward(params, config, tokens_BT, jnp.zeros((B,), jnp.int32), lengths_B - 1, cache)
    first_B = _select(logits_BV, lengths_B, temperature, top_k, top_p, key, greedy)
    return first_B, logits_BV, cache


def _decode_step(params, cache, tokens_B, pos_B, temperature, top_k, top_p, key, *, config, greedy):
    logits_BV, cache = forward(params, config, tokens_B[:, None], pos_B, jnp.zeros_like(pos_B), cache)
    next_B = _select(logits_BV, pos_B + 1, temperature, top_k, top_p, key, greedy)
    return next_B, pos_B + 1, cache


@dataclasses.dataclass
class DevicePrefill:
    """A prefill on one device: the first tokens and the cache, both still on the device."""

    first_B: jax.Array  # [B] int32: the first generated token of each prompt
    cache: KVCache  # L layers of [B, K, S, H]
    seconds: float  # the compiled prefill, from dispatch to first tokens ready
    compile_s: float  # compilation done by this call


class Generator:
    """Generates from one model on the default device, caching compiled code per shape."""

    def __init__(self, params: Params, config: ModelConfig):
        self.params = params
        self.config = config
        self.dtype = params_dtype(params)  # of the weights, the activations and the cache
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
        step = jax.jit(functools.partial(_decode_step, config=cfg, greedy=sampling.greedy), donate_argnums=(1,))
        lengths_B = jnp.asarray(lengths, jnp.int32)
        tok_B = jnp.asarray(first_B, jnp.int32)
        step_c, c2 = self._compiled.get(("step", cache.batch, cache.max_len, sampling.greedy), step,
                                   self.params, cache, lengths_B, lengths_B, *knobs)
        state = {"tok": tok_B, "pos": lengths_B, "cache": cache}

        def dispatch_step():
            state["tok"], state["pos"], state["cache"] = step_c(
                self.params, state["cache"], state["tok"], state["pos"], *knobs)
            return state["tok"]

        t0 = time.perf_counter()
        first = np.asarray(tok_B)
        ttft = prefill_s + time.perf_counter() - t0
        eos = set(cfg.eos_token_ids) if stop_on_eos else set()
        run = decode_loop(dispatch_step, first, max_new_tokens, eos)
        return GenerationResult(run.tokens, ttft, run.seconds, run.steps, prefill_compile_s + c2)


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
                read_tokens=np.asarray) -> DecodeRun:
    """Host loop shared by every decoder.

    `dispatch_step()` launches one decode step and returns its tokens (on device);
    `read_tokens` turns them into a host array [B]. The next
    step is dispatched before the previous one's tokens are read, so the host read overlaps
    device work; a sequence that hits EOS costs at most one wasted step.
    """
    out = [[int(t)] for t in first]
    done = [int(t) in eos for t in first]

    def consume(tokens_B):
        for b, t in enumerate(read_tokens(tokens_B)):
            if not done[b]:
                out[b].append(int(t))
                done[b] = int(t) in eos

    steps, pending = 0, None
    t0 = time.perf_counter()
    while steps < max_new_tokens - 1 and not all(done):
        tokens_B = dispatch_step()
        steps += 1
        if pending is not None:
            consume(pending)
        pending = tokens_B
    if pending is not None:
        consume(pending)
    return DecodeRun(out, steps, time.perf_counter() - t0)
