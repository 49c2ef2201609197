"""How tokens are chosen: the request's `Sampling`, its knobs as traced arguments, and the keys.

Every decoder (single device, wafer mesh, prefill mesh) draws the token at position p with the key
`fold_in(key(seed), p)`, and the draw ties its noise to token ids (kernels/sampling.py), so a
sampled run gives the same tokens on any mesh and on one device. On the meshes each
sequence of a batch has its own Sampling (knobs and seed as [B] arrays), and its tokens never
depend on the other sequences of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
        if not 0 <= self.seed < 2**32:  # the per-core programs take it as a uint32
            raise WaferError(f"seed must be in 0..{2**32 - 1}, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_knobs(sampling: Sampling) -> tuple:
    """The traced sampling arguments (temperature, top_k, top_p, key) of the single-device programs."""
    return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
            jax.random.key(sampling.seed))


def knob_rows(samplings: Sequence[Sampling]) -> list[np.ndarray]:
    """The per-sequence sampling arguments (seed, temperature, top_k, top_p), each [B]."""
    return [np.asarray([getattr(s, name) for s in samplings], dt) for name, dt in (
        ("seed", np.uint32), ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))]


def place_knobs(core_mesh: CoreMesh, samplings: Sequence[Sampling]) -> list[jax.Array]:
    """The sampling arguments (seed, temperature, top_k, top_p) [B] of a per-core program, one per
    sequence, on every core: [R, C, B]."""
    return [core_mesh.broadcast(a) for a in knob_rows(samplings)]


def sampling_keys(key: jax.Array, pos_B: jax.Array) -> jax.Array:
    """[B] keys for choosing the tokens at positions `pos_B`: the position folded into `key`."""
    return jax.vmap(lambda p: jax.random.fold_in(key, p))(pos_B)


def sample_vocab_shards(logits_Bv: jax.Array, vocab_size: int, pos_B: jax.Array, seed_B, temperature_B, top_k_B,
                        top_p_B, greedy: bool) -> jax.Array:
    """Per-core: the tokens at positions `pos_B` from this column's vocabulary block [B, v] of the
    logits (identical on every column), each sequence with its own knobs [B] and its own keys
    (`sampling_keys` of its seed), so its token is the one it would get alone."""
    keys_B = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed_B, pos_B)
    return sample_mesh(logits_Bv, COL, vocab_size, keys_B, temperature_B, top_k_B, top_p_B, greedy)
