"""Ahead-of-time compilation, once per key: compile time is reported apart from the timed work."""

from __future__ import annotations

import time
from collections.abc import Hashable


class CompileCache:
    """Compiled programs by key (the shapes and static choices that select a program)."""

    def __init__(self):
        self._compiled: dict[Hashable, object] = {}

    def get(self, key: Hashable, fn, *args) -> tuple[object, float]:
        """AOT-compile jitted `fn` for `args`' shapes once; returns (compiled, seconds spent now)."""
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key], time.perf_counter() - t0
