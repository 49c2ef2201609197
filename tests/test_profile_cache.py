"""Wafer profiles on disk (serve/profile_cache.py): a hit gives the traced answer without tracing,
a refusal comes back as the same error, any change of arguments or code is a miss, a broken
entry is a miss, and the code digest covers everything the profiler imports."""

import json
import subprocess
import sys

import pytest

from mesh.errors import WaferError
from mesh.wafer import emulated_spec
from model.config import TINY_LLAMA
from serve import costs
from serve.profile_cache import OFF_ENV, PROFILER_MODULES, cache_dir, cached_profile, profile_key, source_digest

ARGS = (TINY_LLAMA, "2x4", emulated_spec(1 << 20), 4, 64)


def counting(answer):
    calls = []

    def compute():
        calls.append(1)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return compute, calls


def test_a_second_ask_reads_the_disk_and_a_refusal_is_kept(tmp_path):
    compute, calls = counting((0.00123456789012345, 7))
    first = cached_profile(ARGS, compute, WaferError, tmp_path, "code-1")
    again = cached_profile(ARGS, compute, WaferError, tmp_path, "code-1")
    assert first == again == (0.00123456789012345, 7) and len(calls) == 1  # the float's bits survive JSON
    refuse, refusals = counting(WaferError("does not fit: short by 12 B"))
    other = ARGS[:3] + (8, 64)
    for _ in range(2):
        with pytest.raises(WaferError, match="^does not fit: short by 12 B$"):
            cached_profile(other, refuse, WaferError, tmp_path, "code-1")
    assert len(refusals) == 1


def test_any_change_of_arguments_or_code_is_a_miss(tmp_path):
    compute, calls = counting((0.5, 1))
    cached_profile(ARGS, compute, WaferError, tmp_path, "code-1")
    cached_profile(ARGS, compute, WaferError, tmp_path, "code-2")  # the profiler's code changed
    cached_profile(ARGS[:4] + (128,), compute, WaferError, tmp_path, "code-1")  # another context
    cached_profile((TINY_LLAMA, "2x4", emulated_spec(1 << 19), 4, 64), compute, WaferError, tmp_path, "code-1")
    assert len(calls) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    assert profile_key(ARGS, "a") == profile_key(ARGS, "a") != profile_key(ARGS, "b")


def test_a_broken_entry_is_a_miss_and_is_rewritten(tmp_path):
    compute, calls = counting((0.25, 3))
    cached_profile(ARGS, compute, WaferError, tmp_path, "c")
    (entry,) = tmp_path.glob("*.json")
    for broken in ("{\"token_s\": 0.2", json.dumps({"token_s": "fast", "wafers": 3}), "[]"):
        entry.write_text(broken)
        assert cached_profile(ARGS, compute, WaferError, tmp_path, "c") == (0.25, 3)
    assert len(calls) == 4 and json.loads(entry.read_text()) == {"token_s": 0.25, "wafers": 3}


def test_the_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("WAFER_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "profiles"
    monkeypatch.setenv(OFF_ENV, "off")
    assert cache_dir() is None
    compute, calls = counting((0.5, 1))
    cached_profile(ARGS, compute, WaferError)
    cached_profile(ARGS, compute, WaferError)
    assert len(calls) == 2 and not any(tmp_path.rglob("*.json"))


def test_the_digest_follows_the_files_contents(monkeypatch, tmp_path):
    (tmp_path / "fakeprofiler").mkdir()
    (tmp_path / "fakeprofiler" / "__init__.py").write_text("")
    (tmp_path / "fakeprofiler" / "step.py").write_text("COST = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_digest(("fakeprofiler",))
    (tmp_path / "fakeprofiler" / "step.py").write_text("COST = 2\n")
    source_digest.cache_clear()
    assert source_digest(("fakeprofiler",)) != before
    source_digest.cache_clear()


def test_wafer_decode_from_the_disk_equals_the_traced_one(monkeypatch, tmp_path):
    monkeypatch.setenv("WAFER_CACHE_DIR", str(tmp_path))
    costs._profile.cache_clear()
    traced = costs.wafer_decode(TINY_LLAMA, emulated_spec(1 << 20), "2x4", context=64, slots=4)
    costs._profile.cache_clear()

    def no_tracing(*args):
        raise AssertionError("traced again")

    monkeypatch.setattr(costs, "_trace_profile", no_tracing)
    assert costs.wafer_decode(TINY_LLAMA, emulated_spec(1 << 20), "2x4", context=64, slots=4) == traced
    costs._profile.cache_clear()


def test_the_digest_covers_every_project_module_the_profiler_imports():
    """A fresh interpreter imports the profiler; every module of this project it loads must be
    one whose source is in the digest (else an edit there would leave stale profiles readable)."""
    script = ("import sys, pathlib, serve.costs, model.trace_decode, mesh.executors\n"
              "root = pathlib.Path.cwd().resolve()\n"
              "env = pathlib.Path(sys.prefix).resolve()  # a venv inside the checkout is not the project\n"
              "for name, m in sorted(sys.modules.items()):\n"
              "    f = getattr(m, '__file__', None)\n"
              "    p = f and pathlib.Path(f).resolve()\n"
              "    if p and p.is_relative_to(root) and not p.is_relative_to(env): print(name)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=costs.__file__.rsplit("/serve/", 1)[0]).stdout.split()
    assert "model.trace_decode" in out and "kernels.allreduce" in out
    # `serve` is the package of serve.costs: its __init__ is a docstring, imported by any module of it.
    uncovered = [m for m in out if m != "serve" and not any(m == p or m.startswith(p + ".") for p in PROFILER_MODULES)]
    assert uncovered == []
    assert source_digest() == source_digest(PROFILER_MODULES) and len(source_digest()) == 64
