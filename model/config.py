"""Model configurations and presets for the Llama-family decoders the project runs.

A config is frozen and hashable so it can be a static `jax.jit` argument; variants come from
`dataclasses.replace`. Presets are plain literals. The large presets (8B and up) are analytic:
their shapes feed the planner and the profiler through `jax.eval_shape` and are never allocated
in tests.
"""

from __future__ import annotations

import dataclasses
import enum

from mesh.errors import WaferError
from mesh.extent import round_up


class RopeScaling(enum.Enum):
    NONE = "none"
    LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2).

    Letters: D model width, F feed-forward width, N query heads, K KV heads, H head dim,
    L layers, V vocabulary.
    """

    name: str
    vocab_size: int  # V
    dim: int  # D
    ffn_dim: int  # F
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    rope_scaling: RopeScaling = RopeScaling.NONE
    # Llama-3 rope scaling parameters (used only when rope_scaling is LLAMA3).
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise WaferError(
                f"config {self.name}: {self.n_heads} query heads do not group evenly over "
                f"{self.n_kv_heads} KV heads"
            )
        for field in ("vocab_size", "dim", "ffn_dim", "n_layers", "n_heads", "head_dim", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise WaferError(f"config {self.name}: {field} must be positive")

    @property
    def q_per_kv(self) -> int:  # G = N / K
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize


SMOLLM2_135M = ModelConfig(
    name="smollm2-135m",
    vocab_size=49152,
    dim=576,
    ffn_dim=1536,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    max_seq_len=8192,
    rope_theta=100000.0,
    rms_eps=9.999999747378752e-06,
    tie_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
)

# Small random-weight configs for tests: one of each feature combination the loaders support.
TINY_LLAMA = ModelConfig(
    name="tiny-llama",
    vocab_size=512,
    dim=64,
    ffn_dim=160,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    max_seq_len=256,
    rope_theta=500000.0,
    rope_scaling=RopeScaling.LLAMA3,
    rope_factor=8.0,
    rope_original_max_pos=64,
)
TINY_QWEN2 = dataclasses.replace(
    TINY_LLAMA, name="tiny-qwen2", qkv_bias=True, rope_scaling=RopeScaling.NONE, rope_theta=1e6,
    rms_eps=1e-6, tie_embeddings=True,
)

# Analytic presets: published shapes, used for planning and profiling only.
LLAMA3_8B = ModelConfig(
    name="llama3-8b", vocab_size=128256, dim=4096, ffn_dim=14336, n_layers=32, n_heads=32,
    n_kv_heads=8, head_dim=128, max_seq_len=8192, rope_theta=500000.0,
)
LLAMA2_13B = ModelConfig(
    name="llama2-13b", vocab_size=32000, dim=5120, ffn_dim=13824, n_layers=40, n_heads=40,
    n_kv_heads=40, head_dim=128, max_seq_len=4096, rope_theta=10000.0,
)
LLAMA31_70B = ModelConfig(
    name="llama3.1-70b", vocab_size=128256, dim=8192, ffn_dim=28672, n_layers=80, n_heads=64,
    n_kv_heads=8, head_dim=128, max_seq_len=131072, rope_theta=500000.0,
    rope_scaling=RopeScaling.LLAMA3,
)
LLAMA31_405B = ModelConfig(
    name="llama3.1-405b", vocab_size=128256, dim=16384, ffn_dim=53248, n_layers=126, n_heads=128,
    n_kv_heads=8, head_dim=128, max_seq_len=131072, rope_theta=500000.0,
    rope_scaling=RopeScaling.LLAMA3,
)
QWEN2_72B = ModelConfig(
    name="qwen2-72b", vocab_size=152064, dim=8192, ffn_dim=29568, n_layers=80, n_heads=64,
    n_kv_heads=8, head_dim=128, max_seq_len=32768, rope_theta=1000000.0, rms_eps=1e-6,
    qkv_bias=True,
)

CODELLAMA_34B = ModelConfig(
    name="codellama-34b", vocab_size=32000, dim=8192, ffn_dim=22016, n_layers=48, n_heads=64,
    n_kv_heads=8, head_dim=128, max_seq_len=16384, rope_theta=1000000.0,
)

# WaferLLM's decode benchmark shapes (MeshInfra/WaferLLM, Decode/WSE-2/model_config/*.json): one
# head of head_dim = dim (n_heads = n_kv_heads = 1), so the score q.K^T is a partial dot product
# per core all-reduced along a whole mesh axis; no QKV bias (its decode program has none, Qwen2's
# included); ~4K positions. Its JSON files round dim, ffn_dim and the context up to multiples of
# the grid side P (`waferllm_config`); the presets keep the models' own widths, which a P x P
# layout pads to the same per-core extents. Its repository ships Llama3-8B and Qwen2-72B files;
# the Llama2-13B and CodeLlama-34B rows of its paper's table follow the same rule here.
WAFERLLM_CONTEXT = 4096


def _waferllm(name: str, model: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model, name=name, n_heads=1, n_kv_heads=1, head_dim=model.dim,
                               max_seq_len=WAFERLLM_CONTEXT, qkv_bias=False, rope_scaling=RopeScaling.NONE)


WAFERLLM_LLAMA3_8B = _waferllm("waferllm-llama3-8b", LLAMA3_8B)
WAFERLLM_LLAMA2_13B = _waferllm("waferllm-llama2-13b", LLAMA2_13B)
WAFERLLM_CODELLAMA_34B = _waferllm("waferllm-codellama-34b", CODELLAMA_34B)
WAFERLLM_QWEN2_72B = _waferllm("waferllm-qwen2-72b", QWEN2_72B)
WAFERLLM_PRESETS = (WAFERLLM_LLAMA3_8B, WAFERLLM_LLAMA2_13B, WAFERLLM_CODELLAMA_34B, WAFERLLM_QWEN2_72B)


def waferllm_config(config: ModelConfig, side: int) -> ModelConfig:
    """A WaferLLM preset with its widths and context rounded up to multiples of the grid side, as
    its JSON files are (e.g. Llama3-8B on 420 x 420: dim 4200, ffn_dim 14700, seq_len 4200)."""
    dim = round_up(config.dim, side)
    return dataclasses.replace(config, dim=dim, head_dim=dim, ffn_dim=round_up(config.ffn_dim, side),
                               max_seq_len=round_up(config.max_seq_len, side))


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (SMOLLM2_135M, TINY_LLAMA, TINY_QWEN2, LLAMA3_8B, LLAMA2_13B, LLAMA31_70B, LLAMA31_405B,
              QWEN2_72B, CODELLAMA_34B) + WAFERLLM_PRESETS
}
# Presets whose weights ship with the project (everything else is shapes only).
EMBEDDED_MODELS = ("smollm2-135m",)


def preset(name: str) -> ModelConfig:
    """Look up a preset by name; an unknown name is a `WaferError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise WaferError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
