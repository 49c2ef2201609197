"""The house rules on where code lives, checked on the source: data flows one way (DESIGN.md's
layers), no import cycle between any two files, only the command line parses arguments or prints,
and no module reaches into another's private names."""

from __future__ import annotations

import ast
import graphlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "kernels", "model", "kvcache", "serve", "bench", "cli", "tests")

# What each layer may import from the project (itself included). Lower layers never import upward.
MAY_IMPORT = {
    "mesh": {"mesh"},
    "kernels": {"mesh", "kernels"},
    "model": {"mesh", "kernels", "model"},
    "kvcache": {"mesh", "kernels", "model", "kvcache"},
    "serve": {"mesh", "kernels", "model", "kvcache", "serve"},
    "bench": {"mesh", "kernels", "model", "kvcache", "serve", "bench"},
    "cli": {"mesh", "kernels", "model", "kvcache", "serve", "bench", "cli"},
    "tests": set(PACKAGES),
}

# Programs run as their own processes by a benchmark, talking JSON lines to their parent over a
# pipe: their stdout is a protocol, not a report for the user.
PIPE_PROGRAMS = {"bench.kv_peer"}


def _modules() -> dict[str, ast.Module]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return mods


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) for every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, a.name) for a in node.names]
    return out


def _project_deps(name: str) -> set[str]:
    deps = set()
    for module, what in _imports(MODULES[name]):
        if what is not None and f"{module}.{what}" in MODULES:
            deps.add(f"{module}.{what}")  # `from pkg import module`
        elif module in MODULES:
            deps.add(module)
    return deps - {name}


def test_the_checker_sees_the_project():
    assert {"model.block", "kvcache.format", "cli.main", "mesh.axes"} <= set(MODULES)
    assert "model.cache" in _project_deps("model.forward")


def test_no_import_cycle_between_files():
    sorter = graphlib.TopologicalSorter({name: _project_deps(name) for name in MODULES})
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


@pytest.mark.parametrize("layer", [p for p in PACKAGES if p != "tests"])
def test_data_flows_one_way(layer):
    wrong = sorted(f"{name} imports {dep}" for name in MODULES if name.split(".")[0] == layer
                   for dep in _project_deps(name) if dep.split(".")[0] not in MAY_IMPORT[layer])
    assert not wrong, wrong


def test_only_the_command_line_parses_arguments_or_prints():
    offenders = []
    for name, tree in MODULES.items():
        if name.split(".")[0] in ("cli", "tests") or name in PIPE_PROGRAMS:
            continue
        offenders += [f"{name} imports argparse" for module, _ in _imports(tree) if module == "argparse"]
        offenders += [f"{name}:{node.lineno} calls print" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not offenders, offenders


def test_no_private_name_imported_across_modules():
    offenders = [f"{name} imports {module}.{what}" for name, tree in MODULES.items()
                 for module, what in _imports(tree) if what and what.startswith("_") and module in MODULES]
    assert not offenders, offenders
