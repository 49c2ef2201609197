"""Extents of a dimension split into blocks: the ceiling division every padded layout uses."""


def ceil_div(a, b):
    """ceil(a / b) for positive b: blocks of b needed to cover a (also for traced jax integers)."""
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return ceil_div(n, m) * m
