"""The import rules of docs/architecture.md, read from the code (an AST walk, no imports).

Every `import` counts, at module level or inside a function, except those under
`if TYPE_CHECKING:` (they never run). So a lazy import cannot hide a cycle: lazy imports are
for start-up time, and the graph with them must still be acyclic.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests.support.paths import ROOT

PACKAGE = ROOT / "tsctl"
#: generated code and tsctl's copy of TorchServe's `ts` API (imported as `ts` in workers)
SKIPPED = ("tsctl/proto_gen/", "tsctl/worker/compat/")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if not str(path.relative_to(ROOT)).startswith(SKIPPED):
            found[_module_name(path)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in `tree` names (absolute, with its parents)."""
    names: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        stack.extend(ast.iter_child_nodes(node))
    return names


@cache
def imports() -> dict[str, frozenset[str]]:
    """module -> the names it imports (any module, tsctl's or not)."""
    graph = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = frozenset(_imported_names(tree, module, path.name == "__init__.py"))
    return graph


def internal_edges(module: str) -> set[str]:
    """The tsctl modules `module` imports (a package's own `__init__` is not an edge)."""
    known = _modules()
    return {name for name in imports()[module] if name in known and name != module}


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for nxt in internal_edges(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def test_the_walk_sees_the_code() -> None:
    """Guards the checks below against passing because they see nothing."""
    assert len(_modules()) > 60
    assert "tsctl.server.registry" in internal_edges("tsctl.server.daemon")
    assert "tsctl.ipc.messages" in internal_edges("tsctl.ipc.codec")
    assert "tornado.web" in imports()["tsctl.server.api.rest"]


def test_no_import_cycles() -> None:
    cycles = sorted(m for m in _modules() if m in reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("tsctl.client", "tsctl.server"),  # a client never reaches into the daemon
        ("tsctl.client", "tsctl.cli"),
        ("tsctl.local", "tsctl.server"),  # shared by CLI and clients, so neither
        ("tsctl.local", "tsctl.client"),
        ("tsctl.ipc", "tsctl.server"),  # both sides use the codec; it uses neither
        ("tsctl.ipc", "tsctl.worker"),
        ("tsctl.archive", "tsctl.server"),
        ("tsctl.worker", "tsctl.server"),  # the worker knows the daemon only through ipc
        ("tsctl.server", "tsctl.cli"),
        ("tsctl.server", "tsctl.client"),
        ("tsctl.errors", "tsctl.server"),
    ],
)
def test_layers(layer: str, forbidden: str) -> None:
    offenders = {
        module: sorted(m for m in reachable(module) if _in(m, forbidden))
        for module in _modules()
        if _in(module, layer)
    }
    offenders = {m: found for m, found in offenders.items() if found}
    assert not offenders, f"{layer} must not import {forbidden}: {offenders}"


@pytest.mark.parametrize("heavy", ["tornado", "grpc"])
def test_the_worker_imports_no_server_frameworks(heavy: str) -> None:
    worker = [m for m in _modules() if _in(m, "tsctl.worker")]
    offenders = {
        module: sorted(
            name for m in {module, *reachable(module)} for name in imports()[m] if _in(name, heavy)
        )
        for module in worker
    }
    offenders = {m: found for m, found in offenders.items() if found}
    assert not offenders, f"the worker imports {heavy}: {offenders}"


def test_the_core_imports_no_api_surface() -> None:
    """Registry, batching, workers and friends serve every API; none imports one."""
    core = [
        m
        for m in _modules()
        if _in(m, "tsctl.server")
        and not _in(m, "tsctl.server.api")
        and m not in ("tsctl.server.daemon", "tsctl.server.boot")  # they start the APIs
    ]
    offenders = {
        m: sorted(e for e in internal_edges(m) if _in(e, "tsctl.server.api")) for m in core
    }
    offenders = {m: found for m, found in offenders.items() if found}
    assert not offenders, offenders
