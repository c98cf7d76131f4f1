"""A workflow's YAML spec (TorchServe's `models` and `dag`), read and checked into a `Dag`.

Pure: no I/O, no event loop. `models` holds global settings (`min-workers`, `max-workers`,
`batch-size`, `max-batch-delay`, `retry-attempts`, `timeout-ms`) and one mapping per model
(`url` plus any of those, which win over the global ones). `dag` maps each node to the nodes it
feeds. A node that is not one of the models is a function of the workflow's handler file, run
with TorchServe's settings for functions (one worker, batches of one, no batch delay).

Checked as TorchServe does, with a message naming the problem: exactly one start node, no
cycle, no node feeding itself; and also what TorchServe finds only at inference or worker
start: a node that is neither a model nor a name the handler file binds at its top level, a model
without `url`, settings that are not whole numbers in range, names that cannot name a model.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, replace
from typing import Any

from tsctl.errors import BadRequest

#: the most nodes one workflow may have (each is a model with its own workers)
MAX_NODES = 64

#: spec key -> (NodeSettings field, lowest allowed value)
_SETTINGS = {
    "min-workers": ("min_workers", 0),
    "max-workers": ("max_workers", 0),
    "batch-size": ("batch_size", 1),
    "max-batch-delay": ("max_batch_delay", 0),
    "retry-attempts": ("retry_attempts", 0),
    "timeout-ms": ("timeout_ms", 1),
}


class InvalidWorkflowSpec(BadRequest):
    """A spec TorchServe would refuse (400, its `InvalidDAGException`)."""

    type_name = "InvalidDAGException"


@dataclass(frozen=True)
class NodeSettings:
    """TorchServe's defaults for workflow models."""

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay: int = 50
    retry_attempts: int = 1
    timeout_ms: int = 10000


@dataclass(frozen=True)
class Node:
    name: str
    #: the model's archive (`url` in the spec); None for a function of the handler file
    url: str | None
    settings: NodeSettings

    @property
    def is_function(self) -> bool:
        return self.url is None


@dataclass(frozen=True)
class Dag:
    nodes: dict[str, Node]
    children: dict[str, tuple[str, ...]]
    parents: dict[str, tuple[str, ...]]
    start: str
    #: the nodes in an order where each comes after all its parents
    order: tuple[str, ...]

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.children[n])


@dataclass(frozen=True)
class WorkflowSpec:
    settings: NodeSettings
    dag: Dag
    #: the `dag` section as TorchServe's describe API shows it (`{a=[b], b=[c]}`)
    dag_text: str


#: in `handler_functions`' answer: the handler file star-imports, so any name may be bound
ANY_NAME = "*"


def handler_functions(source: str, name: str) -> set[str]:
    """The names a handler file binds at its top level (read, not run): what TorchServe's
    `hasattr(module, node)` finds, so `def`, `class`, assignments and imports, also inside a
    top-level `if`, `try` or `with`. A star import gives `ANY_NAME` (any node may be one)."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as exc:
        raise InvalidWorkflowSpec(f"handler file {name} is not valid Python: {exc.msg}") from None
    found: set[str] = set()
    _bound(tree.body, found)
    return found


def _bound(body: list[ast.stmt], found: set[str]) -> None:
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                found.update(_target_names(target))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            found.update(_target_names(node.target))
        elif isinstance(node, ast.Import):
            found.update(a.asname or a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(ANY_NAME if a.name == "*" else a.asname or a.name for a in node.names)
        elif isinstance(node, ast.If | ast.With | ast.AsyncWith):
            _bound(node.body, found)
            _bound(getattr(node, "orelse", []), found)
        elif isinstance(node, ast.Try | ast.TryStar):
            for part in (node.body, node.orelse, node.finalbody):
                _bound(part, found)
            for handler in node.handlers:
                _bound(handler.body, found)


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [n for element in target.elts for n in _target_names(element)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []  # an attribute or an item: binds no name of the module


def _setting(key: str, value: Any, where: str) -> tuple[str, int]:
    field, low = _SETTINGS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidWorkflowSpec(
            f"Invalid workflow specification: {where}{key} must be a whole number of at "
            f"least {low}, not {value!r}"
        )
    return field, value


def _node_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidWorkflowSpec(f"Invalid workflow specification: {where} {name!r} is no name")
    clean: str = name.strip()
    if not all(c.isascii() and (c.isalnum() or c in "_-.") for c in clean):
        raise InvalidWorkflowSpec(
            f"Invalid workflow specification: {where} {clean!r} may hold only letters, digits, "
            "'_', '-' and '.'"
        )
    return clean


def _models(section: Any) -> tuple[NodeSettings, dict[str, tuple[str, dict[str, int]]]]:
    if not isinstance(section, dict):
        raise InvalidWorkflowSpec("Invalid workflow specification: `models` must be a mapping")
    overall: dict[str, int] = {}
    models: dict[str, tuple[str, dict[str, int]]] = {}
    for key, value in section.items():
        if key in _SETTINGS:
            field, number = _setting(key, value, "models: ")
            overall[field] = number
            continue
        name = _node_name(key, "model")
        if not isinstance(value, dict):
            raise InvalidWorkflowSpec(
                f"Invalid workflow specification: model {name} must be a mapping with a url"
            )
        url = value.get("url")
        if not isinstance(url, str) or not url.strip():
            raise InvalidWorkflowSpec(f"Invalid workflow specification: model {name} has no url")
        own = dict(_setting(k, v, f"model {name}: ") for k, v in value.items() if k in _SETTINGS)
        models[name] = (url.strip(), own)
    return NodeSettings(**overall), models


def _edges(section: Any) -> dict[str, list[str]]:
    if not isinstance(section, dict) or not section:
        raise InvalidWorkflowSpec("Invalid workflow specification: `dag` must be a mapping")
    edges: dict[str, list[str]] = {}
    for key, value in section.items():
        name = _node_name(key, "dag node")
        targets = [value] if isinstance(value, str) else value
        if targets is None:
            targets = []
        if not isinstance(targets, list):
            raise InvalidWorkflowSpec(
                f"Invalid workflow specification: dag node {name} must list the nodes it feeds"
            )
        found = edges.setdefault(name, [])
        seen = set(found)
        for target in targets:
            if target is None or (isinstance(target, str) and not target.strip()):
                continue  # TorchServe skips empty names
            child = _node_name(target, f"dag node {name} feeds")
            if child == name:
                raise InvalidWorkflowSpec(
                    f"Invalid workflow specification: node {name} feeds itself (self loop)"
                )
            if child not in seen:
                seen.add(child)
                found.append(child)
            edges.setdefault(child, [])
            _count(edges)
        _count(edges)
    return edges


def _count(edges: dict[str, list[str]]) -> None:
    """Checked as the nodes are found, so a huge `dag` is refused early."""
    if len(edges) > MAX_NODES:
        raise InvalidWorkflowSpec(
            f"Invalid workflow specification: over the limit of {MAX_NODES} nodes"
        )


def _order(edges: dict[str, list[str]], parents: dict[str, list[str]]) -> tuple[str, list[str]]:
    starts = [n for n in edges if not parents[n]]
    if len(starts) != 1:
        shown = ", ".join(starts) if starts else "none"
        raise InvalidWorkflowSpec(
            f"Invalid workflow specification: DAG should have only one start node (found: {shown})"
        )
    waiting = {n: len(parents[n]) for n in edges}
    order: list[str] = []
    ready = [starts[0]]
    while ready:
        node = ready.pop(0)
        order.append(node)
        for child in edges[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(order) != len(edges):
        stuck = ", ".join(n for n in edges if waiting[n] > 0)
        raise InvalidWorkflowSpec(
            f"Invalid workflow specification: Not a valid DAG: a cycle runs through {stuck}"
        )
    return starts[0], order


def parse_spec(loaded: Any, functions: set[str], handler: str | None) -> WorkflowSpec:
    """The spec as YAML loaded it, checked against the functions the handler file defines."""
    if not isinstance(loaded, dict):
        raise InvalidWorkflowSpec("Invalid workflow specification: it must be a mapping")
    if "dag" not in loaded:
        raise InvalidWorkflowSpec("Invalid workflow specification: it has no `dag` section")
    overall, models = _models(loaded.get("models") or {})
    edges = _edges(loaded["dag"])
    parents: dict[str, list[str]] = {n: [] for n in edges}
    for node, targets in edges.items():
        for child in targets:
            parents[child].append(node)
    start, order = _order(edges, parents)
    function_settings = NodeSettings(1, 1, 1, 0, overall.retry_attempts, overall.timeout_ms)
    nodes: dict[str, Node] = {}
    for name in order:
        if name in models:
            url, own = models[name]
            nodes[name] = Node(name, url, replace(overall, **own))
        elif name in functions or ANY_NAME in functions:
            if not name.isidentifier():
                raise InvalidWorkflowSpec(f"Invalid workflow specification: {name} is no function")
            nodes[name] = Node(name, None, function_settings)
        else:
            where = f"a function of the handler file {handler}" if handler else "a function"
            extra = "" if handler else " (the workflow archive has no handler file)"
            raise InvalidWorkflowSpec(
                f"Invalid workflow specification: unknown node {name}: it is neither a model "
                f"of `models` nor {where}{extra}"
            )
    dag = Dag(
        nodes,
        {n: tuple(edges[n]) for n in order},
        {n: tuple(parents[n]) for n in order},
        start,
        tuple(order),
    )
    declared = [str(k).strip() for k in loaded["dag"]]  # as written: leaves it names not
    text = "{" + ", ".join(f"{n}=[{', '.join(edges[n])}]" for n in declared) + "}"
    return WorkflowSpec(overall, dag, text)
