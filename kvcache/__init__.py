"""The KV cache pytree and its layouts."""
