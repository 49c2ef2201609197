"""Load a Hugging Face checkpoint folder (`config.json` + `*.safetensors`).

Supported architectures: LlamaForCausalLM (with Llama-3 rope scaling), MistralForCausalLM,
Qwen2ForCausalLM (QKV bias). Reads both the transformers-4 config keys (`rope_theta`,
`rope_scaling`) and the transformers-5 ones (`rope_parameters`).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from mesh.errors import WaferError
from model.config import ModelConfig, RopeScaling
from model.tokenizer import TextTokenizer, tokenizer_from_hf_folder

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_hf_checkpoint(folder: str) -> tuple[ModelConfig, dict[str, np.ndarray], TextTokenizer | None]:
    """Config, HF-named float32 tensors and tokenizer (None if absent) of a checkpoint folder."""
    config = read_hf_config(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise WaferError(f"{folder}: no *.safetensors files")
    from safetensors import safe_open  # imported here: only HF folders need it

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            # framework="flax" reads bfloat16 too, which plain numpy cannot represent.
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad bytes
            raise WaferError(f"{path}: not a readable safetensors file ({e})") from None
    return config, tensors, tokenizer_from_hf_folder(folder)


def read_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise WaferError(f"checkpoint not found: {folder}")
    if not os.path.exists(path):
        raise WaferError(f"{folder}: no config.json (expected an HF checkpoint folder or a .gguf file)")
    try:
        with open(path) as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WaferError(f"{path}: not valid JSON ({e})") from None
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise WaferError(f"{folder}: unsupported architecture {archs or c.get('model_type')!r} "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise WaferError(f"{folder}: attention_bias/mlp_bias on {arch} is not supported")
    try:
        n_heads = int(c["num_attention_heads"])
        dim = int(c["hidden_size"])
        rope = dict(c.get("rope_parameters") or {})
        legacy_scaling = c.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy_scaling.items() if k not in rope})
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise WaferError(f"{folder}: rope type {rope_type!r} is not supported (default, llama3)")
        max_len = int(c.get("max_position_embeddings", 2048))
        # Sliding-window attention equals full attention while the context fits the window;
        # beyond it we would be wrong, so the window caps the context instead.
        window = c.get("sliding_window") if arch == "MistralForCausalLM" or c.get("use_sliding_window") else None
        if window:
            max_len = min(max_len, int(window))
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        extra = {}
        if rope_type == "llama3":
            extra = dict(rope_scaling=RopeScaling.LLAMA3, rope_factor=float(rope["factor"]),
                         rope_low_freq_factor=float(rope["low_freq_factor"]),
                         rope_high_freq_factor=float(rope["high_freq_factor"]),
                         rope_original_max_pos=int(rope["original_max_position_embeddings"]))
        return ModelConfig(
            name=os.path.basename(os.path.normpath(folder)),
            vocab_size=int(c["vocab_size"]),
            dim=dim,
            ffn_dim=int(c["intermediate_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or dim // n_heads),
            max_seq_len=max_len,
            rope_theta=theta,
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **extra,
        )
    except KeyError as e:
        raise WaferError(f"{path}: missing key {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise WaferError(f"{path}: bad value ({e})") from None
