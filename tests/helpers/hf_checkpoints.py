"""Random-weight Hugging Face checkpoints for tests: small Llama-3, Qwen2 and Mistral folders.

Written by transformers itself (its config class, its model class, `save_pretrained` to
safetensors), so each folder is exactly what a real HF checkpoint looks like, and HF's own load of
the folder is a reference that shares none of our loading code.

Weights are redrawn after HF's init:
- matrices with std 0.2: HF's default 0.02 gives nearly flat logits, whose greedy tokens hardly
  depend on the input, so a wrong forward pass could still pick the same tokens;
- RMSNorm scales around 1 and biases non-zero: HF initializes them to exactly 1 and 0, which
  would hide a loader that drops or misplaces them.
"""

from __future__ import annotations

import json
import os

WEIGHT_STD = 0.2
NORM_STD = 0.1  # norm scales are 1 + NORM_STD * N(0, 1)

# One small shape shared by every architecture: GQA with 2 query heads per KV head.
TINY_SHAPES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Llama-3 rope scaling with a short original context: head_dim 16 and theta 5e5 give rotary
# wavelengths 6.3, 32, 167, ... positions, so with 64 original positions (high-frequency cutoff
# 64 / 4 = 16, low-frequency cutoff 64 / 1 = 64) the first pair is kept, the second is
# interpolated and the rest are divided by the factor: all three branches of the formula run.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# Mistral with a head dim that is not hidden_size / heads (N * H = 128 != D = 64), and a sliding
# window longer than any test sequence (attention is then full) but shorter than
# max_position_embeddings, so the loader must cap the context at it.
MISTRAL_HEAD_DIM = 32
MISTRAL_WINDOW = 128


def randomize_weights(model, seed: int) -> None:
    """Redraw every parameter of an HF model in place (see the module docstring for why)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise)


def _save(model, path: str, seed: int) -> str:
    import torch

    randomize_weights(model, seed)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return str(path)


def write_llama3(path: str, seed: int = 0, legacy_config_keys: bool = False) -> str:
    """LlamaForCausalLM with Llama-3 rope scaling and GQA; returns `path`.

    legacy_config_keys: rewrite config.json the way transformers 4 wrote it (`rope_theta` at the
    top level, the scaling in `rope_scaling`), the format of most Llama-3.x checkpoints on the Hub.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_SHAPES, rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False)
    _save(LlamaForCausalLM(config), path, seed)
    if legacy_config_keys:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            c = json.load(f)
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        with open(config_path, "w") as f:
            json.dump(c, f, indent=2)
    return str(path)


def write_qwen2(path: str, tie: bool, seed: int = 1, **shapes) -> str:
    """Qwen2ForCausalLM (QKV bias, rope theta 1e6), with or without a tied LM head; returns `path`.
    `shapes` override TINY_SHAPES (e.g. more query heads per KV head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**TINY_SHAPES, **shapes}, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                         rms_norm_eps=1e-6, tie_word_embeddings=tie)
    return _save(Qwen2ForCausalLM(config), path, seed)


def write_mistral(path: str, seed: int = 2) -> str:
    """MistralForCausalLM with an explicit head dim and a sliding window; returns `path`."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**TINY_SHAPES, head_dim=MISTRAL_HEAD_DIM, sliding_window=MISTRAL_WINDOW,
                           rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                           rms_norm_eps=1e-5, tie_word_embeddings=False)
    return _save(MistralForCausalLM(config), path, seed)
