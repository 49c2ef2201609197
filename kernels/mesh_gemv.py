"""MeshGEMV: a GEMV whose weight is tiled over the core grid, reducing along one mesh axis.

Core (r, c) holds W's tile; its input is the slice of x that lies along the contraction axis on
that core. The local product is a partial sum over the core's slice of the contraction; an
all-reduce along the axis that splits the contraction completes it. Chained GEMVs alternate the
reduction axis (ROW, then COL, ...), so each output already lies where the next GEMV's input
must be, and no transpose ever moves data.
"""

import jax
import jax.numpy as jnp

from kernels.allreduce import Schedule, allreduce


def mesh_gemv(x_Bi: jax.Array, w_io: jax.Array, reduce_axis: str, schedule: Schedule,
              groups: int | None = None) -> jax.Array:
    """Per-core: y[B, o] = allreduce_{reduce_axis}(x[B, i] @ W[i, o]).

    Args:
      x_Bi: [B, i] this core's slice of the input (i = contraction extent per core).
      w_io: [i, o] this core's weight tile.
      reduce_axis: the mesh axis that splits the contraction dimension.
      schedule: how the partial sums are all-reduced.
      groups: K-tree group count (KTREE only).
    """
    with jax.named_scope("mesh_gemv"):
        # Partial sums in float32 whatever the storage dtype: 16-bit tiles, 32-bit accumulation.
        return allreduce(jnp.matmul(x_Bi, w_io, preferred_element_type=jnp.float32), reduce_axis, schedule, groups)


def mesh_gemv_ref(x_BI: jax.Array, w_IO: jax.Array) -> jax.Array:
    """The whole GEMV on one device."""
    return jnp.dot(x_BI, w_IO)
