"""The house rules DESIGN.md draws, read from the code's own imports: deploy/ is a core, two
doors that never import each other, then the rehearsals; deploy/ (outside its rehearsals) runs
on the standard library and vitpod's two leaves; nothing in production imports the test
equipment; vitpod's leaves import nothing of vitpod; no module passes 300 lines."""

import ast
import pathlib
import sys

import pytest

from tests.conftest import ROOT

PRODUCTION = ("vitpod", "deploy")
LEAVES = {"vitpod.protocol", "vitpod.errors"}
# Copied to a worker and run there by the worker's venv, which has vitpod and jax.
ON_THE_WORKER = {"deploy.worker_check"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for top in (*PRODUCTION, "testkit"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: pathlib.Path, module: str, known) -> set[str]:
    """Every module `path` imports, as absolute dotted names (`from a import b` gives a.b
    when a.b is a module, else a)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def _door(module: str) -> str:
    for door in ("deploy.tpu_vm", "deploy.gke", "deploy.sim"):
        if module == door or module.startswith(door + "."):
            return door
    return "deploy.core" if module.startswith("deploy") else module.split(".")[0]


def test_the_two_doors_never_import_each_other_and_the_core_neither(graph):
    arrows = {(_door(a), _door(b)) for a, names in graph.items() for b in names
              if a.startswith("deploy") and b.startswith("deploy")}
    wrong = {arrow for arrow in arrows if arrow in {
        ("deploy.tpu_vm", "deploy.gke"), ("deploy.gke", "deploy.tpu_vm"),
        ("deploy.core", "deploy.tpu_vm"), ("deploy.core", "deploy.gke"),
        ("deploy.core", "deploy.sim"), ("deploy.tpu_vm", "deploy.sim"),
        ("deploy.gke", "deploy.sim")}}
    assert wrong == set()


def test_deploy_runs_on_the_standard_library_and_vitpods_leaves(graph):
    stdlib = set(sys.stdlib_module_names)
    wrong = {(a, b) for a, names in graph.items() if a.startswith("deploy")
             and _door(a) != "deploy.sim" and a not in ON_THE_WORKER for b in names
             if b.split(".")[0] not in stdlib | {"deploy"} and b not in LEAVES}
    assert wrong == set()


def test_production_imports_no_test_equipment_and_the_leaves_nothing_of_vitpod(graph):
    assert {(a, b) for a, names in graph.items() if a.split(".")[0] in PRODUCTION
            and _door(a) != "deploy.sim" for b in names if b.startswith(("testkit", "tests"))
            } == set()
    assert {(a, b) for a in LEAVES for b in graph[a] if b.startswith("vitpod")} == set()


def test_no_module_is_over_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_vitpods_imports_have_no_cycle(graph):
    """Modules import only those to their left (DESIGN.md's order): no import runs back up."""
    inside = {m: {b for b in names if b in graph and b.startswith("vitpod") and b != m}
              for m, names in graph.items() if m.startswith("vitpod")}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for b in sorted(inside[m]):
            visit(b)
        path.pop()
        done.add(m)

    for m in sorted(inside):
        visit(m)
