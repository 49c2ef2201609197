"""The one storage dtype of a run: weights, activations and KV caches are created in it at load.

Accumulation stays float32 where accuracy needs it, whatever the storage dtype: RMSNorm
statistics, softmax, matmul accumulation (`preferred_element_type`) and the logits that sampling
reads. float32 is the CPU default (XLA on CPU ran a bf16 matrix-vector product ~15x slower than
f32, so 16-bit there buys memory, not speed); bfloat16 is the default on a GPU.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mesh.errors import WaferError

# The storage dtypes a run may choose, by the name the flags and the KV wire format use.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def default_dtype_name() -> str:
    """bfloat16 on a GPU, float32 elsewhere."""
    import jax  # here, not at the top: the CLI reads DTYPES for its flags before JAX may start

    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def resolve_dtype(name: str | None) -> np.dtype:
    """The numpy dtype of `name` (None: the backend's default)."""
    name = default_dtype_name() if name is None else name
    if name not in DTYPES:
        raise WaferError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_params(params, dtype):
    """Every weight as a device array of `dtype` (the storage the run chose)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)

