"""Per-core numerical kernels, each with a plain-jnp reference beside it."""
