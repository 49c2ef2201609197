"""Ahead-of-time compilation, once per key: compile time is reported apart from the timed work."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class CompileCache:
    """Compiled programs by key (the shapes and static choices that select a program).

    Thread-safe: a background thread may compile programs ahead of time (a serving worker's
    precompilation) while another asks for them; a key being compiled by one thread is waited
    for, not compiled twice. `compiles` counts the programs compiled so far.
    """

    def __init__(self):
        self._compiled: dict[Hashable, object] = {}
        self._pending: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self.compiles = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._compiled

    def get(self, key: Hashable, fn, *args) -> tuple[object, float]:
        """AOT-compile jitted `fn` for `args`' shapes once; returns (compiled, seconds spent now,
        compiling or waiting for another thread's compilation of the same key).

        `args` may be arrays or `jax.ShapeDtypeStruct`s (with their shardings): only their shapes,
        types and placements select the program.
        """
        t0, waited = time.perf_counter(), False
        while True:
            with self._lock:
                if key in self._compiled:
                    return self._compiled[key], time.perf_counter() - t0 if waited else 0.0
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = done = threading.Event()
                    break
            pending.wait()  # another thread compiles it; if that failed, compile it here
            waited = True
        try:
            compiled = fn.lower(*args).compile()
            with self._lock:
                self._compiled[key] = compiled
                self.compiles += 1
        finally:
            with self._lock:
                del self._pending[key]
            done.set()
        return compiled, time.perf_counter() - t0
