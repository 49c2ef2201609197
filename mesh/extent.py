"""Extents of dimensions cut over a grid."""


def ceil_div(a: int, b: int) -> int:
    """The smallest integer >= a / b (for b > 0): blocks of b that cover a."""
    return -(-a // b)
