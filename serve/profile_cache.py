"""Wafer decode profiles kept on disk, so a simulation does not trace the decode step with JAX again.

Pricing decode on a wafer (`serve.costs.wafer_decode`) traces the decode program with JAX at one
and two layers for every batch size it tries: about 12 s of a default `wafer simulate`, the same
answer every time. An answer (seconds per token and wafers per replica, or the planner's refusal)
is stored as a small JSON file whose name is a digest of everything it depends on:

- the arguments: the model config, the wafer spec, the grid, the batch and the context;
- the code that computes it: every Python file of the packages the profiler imports (`mesh`,
  `model`, `kernels`) and serve/costs.py, by content, as this interpreter would import them, so
  any edit there, committed or not, makes a new key (tests/test_profile_cache.py checks that the
  profiler imports nothing else of the project);
- the versions of JAX and jaxlib and of Python, whose tracing the profile counts.

A stale entry is therefore never read: it is only left behind. Entries are written to a
temporary file and renamed, so a reader never sees half of one; an unreadable entry is a miss.

The entries live in `profiles/` beside the converted weights (`$WAFER_CACHE_DIR`, default
`~/.cache/wafer`; the tests point it into .pytest_cache); `WAFER_PROFILE_CACHE=off` turns the
cache off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
from typing import Callable

OFF_ENV = "WAFER_PROFILE_CACHE"  # set to "off": every profile is traced
# What the profiler's answer depends on, as source: its packages and the module that asks it.
PROFILER_MODULES = ("mesh", "model", "kernels", "serve.costs")
FORMAT = 1  # the entries' layout; bumped if it changes


def cache_dir() -> pathlib.Path | None:
    """Where entries live, or None when the cache is off: `profiles/` in the weight cache's folder
    (model/load.py's `cache_dir`, not imported: it brings JAX)."""
    if os.environ.get(OFF_ENV) == "off":
        return None
    base = os.environ.get("WAFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wafer")
    return pathlib.Path(base) / "profiles"


def source_files(modules: tuple[str, ...] = PROFILER_MODULES) -> list[tuple[str, pathlib.Path]]:
    """The Python files of `modules` where this interpreter imports them from (found without
    importing them, so without JAX): (a name, the path) per file, a package's files in order."""
    out = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(name)
        if spec.submodule_search_locations:
            root = pathlib.Path(next(iter(spec.submodule_search_locations)))
            out += [(f"{name}/{f.relative_to(root)}", f) for f in sorted(root.rglob("*.py"))]
        else:
            out.append((name, pathlib.Path(spec.origin)))
    return out


@functools.lru_cache(maxsize=None)
def source_digest(modules: tuple[str, ...] = PROFILER_MODULES) -> str:
    """A digest of the files of `modules` (names and contents), once per process: the code a
    process profiles with is the code it imported, whatever happens to the files later."""
    h = hashlib.sha256()
    for name, f in source_files(modules):
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": sys.version}
    for dist in ("jax", "jaxlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "none"
    return out


def profile_key(args: tuple, code: str) -> str:
    """The entry name for a profile of `args` (frozen dataclasses, strings and ints) by `code`."""
    described = [dataclasses.asdict(a) if dataclasses.is_dataclass(a) else a for a in args]
    text = json.dumps({"format": FORMAT, "args": described, "code": code, "versions": _versions()},
                      sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: pathlib.Path) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(entry, dict) and (isinstance(entry.get("error"), str) or
                                    (isinstance(entry.get("token_s"), float) and isinstance(entry.get("wafers"), int))):
        return entry
    return None


def _write(path: pathlib.Path, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run the profile


def cached_profile(args: tuple, compute: Callable[[], tuple[float, int]], error: type[Exception],
                   directory: pathlib.Path | None = None, code: str | None = None) -> tuple[float, int]:
    """`compute()`'s (seconds per token, wafers) for `args`, from the disk when it is there; a
    refusal (`error`, raised by `compute`) is kept and raised again the same way.

    `directory` None: `cache_dir()`; `code` None: `source_digest()`."""
    directory = cache_dir() if directory is None else directory
    if directory is None:
        return compute()
    path = directory / f"{profile_key(args, source_digest() if code is None else code)}.json"
    entry = _read(path)
    if entry is None:
        try:
            token_s, wafers = compute()
            entry = {"token_s": float(token_s), "wafers": int(wafers)}
        except error as e:
            entry = {"error": str(e)}
        _write(path, entry)
    if "error" in entry:
        raise error(entry["error"])
    return entry["token_s"], entry["wafers"]
