"""Model weights as a pytree, converted from the HF tensor naming every loader produces.

Layout (one array per layer, never stacked: on CPU a stacked [L, ...] array sliced inside
`scan` streamed weights at under half the rate of per-layer arrays in an unrolled loop):

  params = {
    "embed":      [V, D]
    "final_norm": [D]
    "lm_head":    [V, D]   (absent when the embedding is tied)
    "layers": [ {                      # L entries
        "attn_norm": [D],
        "w_qkv":     [D, (N + 2K) H]  # Q, K, V projections fused: one GEMV instead of three
        "b_qkv":     [(N + 2K) H]     # Qwen2 only
        "w_o":       [N H, D],
        "mlp_norm":  [D],
        "w_gate_up": [D, 2F]          # gate and up fused
        "w_down":    [F, D],
    } ]
  }
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kernels.gemv_cpu import PANEL, pack_panels
from mesh.errors import WaferError
from model.config import ModelConfig

Params = dict


def params_from_hf_state(config: ModelConfig, tensor, dtype=np.float32) -> Params:
    """Build params from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).

    Args:
      config: the model's shapes; every tensor is checked against them.
      tensor: callable name -> np.ndarray in HF layout ([out, in] for linear weights), or
        None when the checkpoint lacks it.
    """
    D, F, N, K, H = config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = tensor(name)
        if arr is None:
            raise WaferError(f"checkpoint is missing tensor {name}")
        if tuple(arr.shape) != shape:
            raise WaferError(f"tensor {name} has shape {tuple(arr.shape)}, config expects {shape}")
        return np.asarray(arr, dtype=dtype)

    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        q = get(p + "self_attn.q_proj.weight", (N * H, D))
        k = get(p + "self_attn.k_proj.weight", (K * H, D))
        v = get(p + "self_attn.v_proj.weight", (K * H, D))
        layer = {
            "attn_norm": get(p + "input_layernorm.weight", (D,)),
            "w_qkv": np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T),
            "w_o": np.ascontiguousarray(get(p + "self_attn.o_proj.weight", (D, N * H)).T),
            "mlp_norm": get(p + "post_attention_layernorm.weight", (D,)),
            "w_gate_up": np.ascontiguousarray(np.concatenate([
                get(p + "mlp.gate_proj.weight", (F, D)), get(p + "mlp.up_proj.weight", (F, D))], axis=0).T),
            "w_down": np.ascontiguousarray(get(p + "mlp.down_proj.weight", (D, F)).T),
        }
        if config.qkv_bias:
            layer["b_qkv"] = np.concatenate([
                get(p + "self_attn.q_proj.bias", (N * H,)), get(p + "self_attn.k_proj.bias", (K * H,)),
                get(p + "self_attn.v_proj.bias", (K * H,))])
        layers.append(layer)
    params = {
        "embed": get("model.embed_tokens.weight", (config.vocab_size, D)),
        "final_norm": get("model.norm.weight", (D,)),
        "layers": layers,
    }
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (config.vocab_size, D))
    return params


def init_random_params(config: ModelConfig, seed: int = 0, scale: float = 0.02) -> Params:
    """Random weights with the right shapes (tests and benchmarks of analytic presets)."""
    rng = np.random.default_rng(seed)
    D, F, N, K, H = config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim

    def normal(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm_scale():
        return (1.0 + rng.standard_normal(D) * 0.1).astype(np.float32)

    layers = []
    for _ in range(config.n_layers):
        layer = {"attn_norm": norm_scale(), "w_qkv": normal(D, (N + 2 * K) * H), "w_o": normal(N * H, D),
                 "mlp_norm": norm_scale(), "w_gate_up": normal(D, 2 * F), "w_down": normal(F, D)}
        if config.qkv_bias:
            layer["b_qkv"] = normal((N + 2 * K) * H)
        layers.append(layer)
    params = {"embed": normal(config.vocab_size, D), "final_norm": norm_scale(), "layers": layers}
    if not config.tie_embeddings:
        params["lm_head"] = normal(config.vocab_size, D)
    return params


def flatten_params(params: Params) -> dict[str, np.ndarray]:
    """Flat `{"layers.3.w_qkv": array, ...}` view, for the on-disk weight cache."""
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(params["layers"]):
        flat.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return flat


def unflatten_params(flat: dict[str, np.ndarray], n_layers: int) -> Params:
    params = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    params["layers"] = [{} for _ in range(n_layers)]
    for k, v in flat.items():
        if k.startswith("layers."):
            _, i, name = k.split(".", 2)
            params["layers"][int(i)][name] = v
    return params


# The block's [K, N] matrices, the ones `pack_block_weights` packs.
BLOCK_MATRICES = ("w_qkv", "w_o", "w_gate_up", "w_down")


def pack_block_weights(params: Params) -> Params:
    """A copy of `params` whose f32 block matrices with N a multiple of 8 are packed into column
    panels (kernels/gemv_cpu.py `pack_panels`, [N / 8, K, 8]) for the CPU panel kernel; everything
    else (embedding, norms, biases) is shared, not copied. Only for the single-device forward:
    its `matmul_f32` takes either layout (prefill rows read the packed one through XLA's dot);
    the mesh executors, the prefill columns and the slot batch keep this module's [K, N] layout."""
    def pack(name, w):
        ok = name in BLOCK_MATRICES and w.ndim == 2 and w.dtype == np.float32 and w.shape[1] % PANEL == 0
        return jnp.asarray(pack_panels(w)) if ok else w
    return {**params, "layers": [{k: pack(k, v) for k, v in layer.items()} for layer in params["layers"]]}


def params_dtype(params: Params) -> np.dtype:
    """The storage dtype the weights were loaded in (model/dtypes.py): the caches made for them
    use it too."""
    return np.dtype(params["embed"].dtype)


def lm_head_weight(params: Params):
    """[V, D] output projection: the tied embedding unless the model has its own head."""
    return params.get("lm_head", params["embed"])


def weight_bytes(params: Params) -> int:
    """Bytes a decode step streams from the weights: every matrix and vector, the LM head once.

    The embedding gather reads one row per token, so a tied embedding counts once (as the head)
    and an untied one contributes only its head.
    """
    flat = flatten_params(params)
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for k, v in flat.items() if k != "embed")
    if "lm_head" not in params:
        total += int(np.prod(params["embed"].shape)) * params["embed"].dtype.itemsize
    return total
