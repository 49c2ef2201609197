"""How tokens are chosen: the request's `Sampling`, its knobs as traced arguments, and the keys.

Every decoder (single device, wafer mesh, prefill mesh) draws the token at position p with the key
`fold_in(key(seed), p)`, so a sampled run gives the same tokens on any mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.lm_head import sample_mesh
from mesh.axes import COL
from mesh.errors import WaferError
from mesh.executors import CoreMesh


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to choose tokens. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise WaferError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise WaferError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise WaferError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def safe_temperature(self) -> float:
        """The temperature the kernels divide by (greedy ignores it, but it must not be 0)."""
        return max(self.temperature, 1e-6)


def sampling_knobs(sampling: Sampling) -> tuple:
    """The traced sampling arguments (temperature, top_k, top_p, key) of the single-device programs."""
    return (jnp.float32(sampling.safe_temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
            jax.random.key(sampling.seed))


def place_knobs(core_mesh: CoreMesh, sampling: Sampling) -> list[jax.Array]:
    """The sampling arguments (seed, temperature, top_k, top_p) of a per-core program, on every core."""
    return [core_mesh.broadcast(np.asarray(v, dt)) for v, dt in (
        (sampling.seed, np.uint32), (sampling.safe_temperature, np.float32),
        (sampling.top_k, np.int32), (sampling.top_p, np.float32))]


def sampling_keys(key: jax.Array, pos_B: jax.Array) -> jax.Array:
    """[B] keys for choosing the tokens at positions `pos_B`: the position folded into `key`."""
    return jax.vmap(lambda p: jax.random.fold_in(key, p))(pos_B)


def sample_vocab_shards(logits_Bv: jax.Array, vocab_size: int, pos_B: jax.Array, seed, temperature, top_k, top_p,
                        greedy: bool) -> jax.Array:
    """Per-core: the tokens at positions `pos_B` from this column's vocabulary block [B, v] of the
    logits (identical on every column)."""
    keys_B = sampling_keys(jax.random.key(seed), pos_B)
    return sample_mesh(logits_Bv, COL, vocab_size, keys_B, temperature, top_k, top_p, greedy)
