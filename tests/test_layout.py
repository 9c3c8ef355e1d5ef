"""The house's layout, read from the source's own imports (an AST scan; nothing is imported).

``api/`` and ``worker/`` stand on ``citi_service/`` and never import each other; ``citi_service/``
imports neither of them; ``citi_engine/`` imports none of the three; and no module of the service
imports itself back through others (every import counts, those inside functions too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ("api", "worker", "citi_service")
PACKAGES = (*SERVICE, "citi_engine")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages``: dotted name -> file."""
    return {_module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, and the top-level packages of everything else."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m if m in known else m.split(".")[0] for m in found}


def import_graph(packages: tuple[str, ...] = SERVICE) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports."""
    mods = modules(packages)
    known = set(mods)
    return {name: imports(name, path, known) & known for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components with more than one module
    (or one module importing itself), each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def offending_imports(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> imported`` for every import of a ``forbidden`` package by a module of package ``importer``."""
    mods = modules(PACKAGES)
    known = set(mods)
    return sorted(f"{name} -> {target}" for name, path in mods.items() if _top(name) == importer
                  for target in imports(name, path, known) if _top(target) in forbidden)


def test_the_scan_sees_the_imports_it_checks():
    graph = import_graph()
    assert {"citi_service.store", "citi_service.settings"} <= graph["api.deps"]
    assert "citi_service.queue" in graph["worker.tasks"]
    assert "worker.lease" in graph["worker.celery_app"]
    # A package-level import of a submodule counts as that submodule.
    assert {"api.routers.jobs", "api.routers.chat"} <= graph["api.main"]


def test_the_api_never_imports_the_worker():
    assert offending_imports("api", ("worker",)) == []


def test_the_worker_never_imports_the_api():
    assert offending_imports("worker", ("api",)) == []


def test_the_service_core_imports_neither_the_api_nor_the_worker():
    assert offending_imports("citi_service", ("api", "worker")) == []


def test_the_engine_imports_nothing_of_the_service():
    assert offending_imports("citi_engine", SERVICE) == []


def test_no_router_imports_another():
    graph = import_graph()
    routers = {name for name in graph if name.startswith("api.routers.")}
    assert sorted(f"{r} -> {t}" for r in routers for t in graph[r] & routers) == []


def test_no_import_cycle_among_the_service_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_among_the_packages():
    mods = modules(PACKAGES)
    known = set(mods)
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for name, path in mods.items():
        graph[_top(name)] |= {_top(t) for t in imports(name, path, known) if _top(t) in PACKAGES} - {_top(name)}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"worker.celery_app": {"worker.lease"}, "worker.lease": {"worker.celery_app"}}) == [
        ["worker.celery_app", "worker.lease"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_inference_server_is_an_app_of_its_own_beside_the_celery_worker():
    graph = import_graph()
    serving = {m for m in graph if m == "worker.inference" or m.startswith("worker.inference.")}
    celery_side = {m for m in graph if m.startswith("worker") and m not in serving}
    assert serving and celery_side
    assert not [(m, sorted(graph[m] & serving)) for m in celery_side if graph[m] & serving]
    assert not [(m, sorted(graph[m] & celery_side)) for m in serving if graph[m] & celery_side]
