"""Vocabulary-sharded LM head and token selection on the mesh.

Core (r, c) holds lm[D_row, V_col]. The logits of column c's vocabulary block are a MeshGEMV
reduced over ROW; selection then works across COL:
- greedy: each core's local (max, first index), merged with pmax then pmin over COL, which
  reproduces `argmax`'s first-occurrence tie-break over the whole vocabulary;
- sampling: the shards are gathered along COL (V floats per sequence) and filtered and sampled
  exactly as `sample_ref` does, with the same keys on every core, so all cores pick the same token.
"""

import jax
import jax.numpy as jnp

from kernels.mesh_gemv import mesh_gemv
from kernels.sampling import sample_ref


def lm_head_logits_mesh(h_Bd: jax.Array, lm_dv: jax.Array, vocab_size: int, row_axis: str, col_axis: str,
                        schedule, groups: int | None = None) -> jax.Array:
    """Per-core logits [B, v] of this column's vocabulary block; padded entries are -inf."""
    with jax.named_scope("lm_head"):
        logits = mesh_gemv(h_Bd, lm_dv, row_axis, schedule, groups).astype(jnp.float32)
        v = lm_dv.shape[-1]
        global_id = jax.lax.axis_index(col_axis) * v + jnp.arange(v)
        return jnp.where(global_id < vocab_size, logits, -jnp.inf)


def argmax_mesh(logits_Bv: jax.Array, col_axis: str) -> jax.Array:
    """Global argmax [B] (int32) of logits sharded over `col_axis`, first occurrence on ties."""
    v = logits_Bv.shape[-1]
    local_idx = jnp.argmax(logits_Bv, axis=-1)
    local_max = jnp.max(logits_Bv, axis=-1)
    global_max = jax.lax.pmax(local_max, col_axis)
    global_idx = (jax.lax.axis_index(col_axis) * v + local_idx).astype(jnp.int32)
    candidate = jnp.where(local_max == global_max, global_idx, jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidate, col_axis)


def sample_mesh(logits_Bv: jax.Array, col_axis: str, vocab_size: int, keys_B, temperature, top_k, top_p,
                greedy: bool) -> jax.Array:
    """Token [B] per sequence, identical on every core."""
    with jax.named_scope("sample"):
        if greedy:
            return argmax_mesh(logits_Bv, col_axis)
        full = jax.lax.all_gather(logits_Bv, col_axis, axis=1, tiled=True)[:, :vocab_size]
        return sample_ref(full, keys_B, temperature, top_k, top_p, greedy=False)
