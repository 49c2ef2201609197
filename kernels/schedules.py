"""The all-reduce schedules and reduction ops by name: plain values, no JAX.

Apart from `kernels/allreduce.py` (which implements them) so that the CLI and the serving
options can name a schedule without importing JAX.
"""

from __future__ import annotations

import enum


class Schedule(enum.Enum):
    PSUM = "psum"
    RING = "ring"
    KTREE = "ktree"


class ReduceOp(enum.Enum):
    SUM = "sum"
    MAX = "max"
