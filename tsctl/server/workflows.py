"""Workflows: the registered ones, their models, and running a request through a DAG.

Event-loop only; nothing here blocks: opening and extracting a `.war` and reading its spec run
in a thread (`asyncio.to_thread`), models load through the registry, and user code (the
handler file's functions as well as the models) runs only in worker processes.

A workflow's nodes are registered as real models named as TorchServe names them,
`{workflow}__{node}`: a model node from its `url` (a `.mar` in the model store, or a URL the
`allowed_urls` rules accept), with the spec's settings; a function node as a model of its own
whose handler is `{handler file}:{function}` (one worker, batches of one: TorchServe's way), so
a function runs in a worker like any handler. Unregistering the workflow unregisters them. They
are left out of snapshots, as in TorchServe.

A request (`run`) starts at the start node with the request's own parts; when a node answers,
each child gets its output as a part named `body` (a child of one parent) or named after the
parent (a child of several), and runs once all its parents have answered. Every node gets the
request's headers. Each node is one request on its model's queue (`inference.Pending`): the
same queues, batches and workers as direct predictions. A node is tried `retry-attempts` more
times after a failure or `timeout-ms` without an answer; then the request fails with the
node's name. The answer is the last node's output, or, with several last nodes, a JSON object
of their outputs by node name. A node's inputs count against `max_request_size` and the answer
against `max_response_size`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tsctl.archive.manifest import Runtime, new_manifest
from tsctl.archive.workflow import check_workflow_name, open_workflow
from tsctl.errors import (
    BadRequest,
    Conflict,
    InferenceTimeout,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
    StartFailed,
    TsctlError,
)
from tsctl.ipc.messages import Part
from tsctl.server import download
from tsctl.server.config import ServerConfig
from tsctl.server.inference import Pending
from tsctl.server.registry import ModelVersion, inside_store
from tsctl.server.request import InferenceRequest, Response
from tsctl.server.settings import LoadOptions
from tsctl.server.workflow_spec import (
    InvalidWorkflowSpec,
    Node,
    WorkflowSpec,
    handler_functions,
    parse_spec,
)

if TYPE_CHECKING:
    from tsctl.server.state import ServerState

log = logging.getLogger("tsctl.server")

_MAX_SPEC_BYTES = 1 << 20
_MAX_HANDLER_BYTES = 1 << 20  # a handler file is parsed (`ast`) in the daemon


class WorkflowNotFound(NotFound):
    type_name = "WorkflowNotFoundException"


class WorkflowNodeFailed(TsctlError):
    """A node of a workflow request failed (TorchServe answers these 500)."""


class RegisterWorkflowParams(BaseModel):
    """`POST /workflows` parameters (query string or JSON body), TorchServe's names."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str | None = None
    workflow_name: str | None = None
    response_timeout: float | None = Field(default=None, gt=0)
    startup_timeout: float | None = Field(default=None, gt=0)


@dataclass
class Workflow:
    name: str
    url: str
    spec: WorkflowSpec
    #: where the `.war` was extracted (the function nodes' model folder)
    directory: Path
    #: the model versions this workflow registered, by node: the only ones it calls or
    #: unregisters (a user's model of the same name is never touched)
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    def model_name(self, node: str) -> str:
        return f"{self.name}__{node}"


@dataclass
class Workflows:
    """The registered workflows by name. `pending` holds the names being registered or
    unregistered (no other registration may take them meanwhile); `models` the model names
    that belong to a workflow, from before each is added until it is gone."""

    known: dict[str, Workflow] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)

    def get(self, name: str) -> Workflow:
        found = self.known.get(name)
        if found is None:
            raise WorkflowNotFound(f"Workflow not found: {name}")
        return found

    def owns(self, model: str) -> bool:
        """Whether `model` belongs to a workflow (snapshots leave those out)."""
        return model in self.models


# -- registration -------------------------------------------------------------------------


def workflow_store(config: ServerConfig) -> Path | None:
    """TorchServe's rule: `workflow_store`, else the model store."""
    return config.workflow_store or config.model_store


def resolve(config: ServerConfig, url: str) -> Path:
    """The `.war` a client's URL names: a file inside the workflow store, never outside."""
    store = workflow_store(config)
    if download.is_remote(url):
        raise BadRequest(
            f"workflow url {url!r}: tsctl registers workflows from the workflow store only; "
            "put the .war there and pass its file name"
        )
    if store is None:
        raise BadRequest("Workflow store has not been configured.")
    named = Path(url.removeprefix("file://"))
    if not inside_store(store, named):
        raise BadRequest(f"Relative path is not allowed in url: {url}")
    candidate = store / named  # `named` itself when it is absolute
    if not candidate.is_file():
        raise WorkflowNotFound(f"Workflow not found in workflow store: {url}")
    return candidate


@dataclass(frozen=True)
class _Prepared:
    name: str
    spec: WorkflowSpec
    directory: Path
    handler: str | None


def _read(path: Path, limit: int, what: str) -> str:
    if not path.is_file():
        raise InvalidWorkflowSpec(f"the workflow archive has no {what} {path.name}")
    if path.stat().st_size > limit:
        raise InvalidWorkflowSpec(f"{what} {path.name} is over {limit} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidWorkflowSpec(f"{what} {path.name} is not UTF-8 text") from None


def _inside(root: Path, name: str, what: str) -> Path:
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root.resolve()):
        raise InvalidWorkflowSpec(f"{what} {name!r} is outside the workflow archive")
    return path


def _load_spec(text: str, name: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidWorkflowSpec(f"Failed to parse yaml {name}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidWorkflowSpec(f"Failed to parse yaml {name}: {exc!r}") from None


def _prepare(path: Path, work_dir: Path, max_bytes: int, asked_name: str | None) -> _Prepared:
    """Blocking: open and check the `.war`, extract it, read and check its spec."""
    with open_workflow(path) as war:
        manifest = war.workflow_manifest
        if asked_name and manifest.workflow is not None:  # TorchServe renames before checking
            manifest = manifest.model_copy(
                update={
                    "workflow": manifest.workflow.model_copy(update={"workflow_name": asked_name})
                }
            )
        manifest.checked(str(path.name))
        assert manifest.workflow is not None and manifest.workflow.workflow_name
        name = check_workflow_name(manifest.workflow.workflow_name)
        target = Path(tempfile.mkdtemp(prefix=f"workflow-{name}-", dir=work_dir))
        try:
            war.extract(target, max_bytes)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    try:
        spec_name = manifest.workflow.spec_file or ""
        text = _read(_inside(target, spec_name, "spec file"), _MAX_SPEC_BYTES, "spec file")
        handler = manifest.workflow.handler or None
        functions: set[str] = set()
        if handler:
            source = _read(_inside(target, handler, "handler file"), _MAX_HANDLER_BYTES, "handler")
            functions = handler_functions(source, handler)
        spec = parse_spec(_load_spec(text, spec_name), functions, handler)
        if handler and any(n.is_function for n in spec.dag.nodes.values()):
            # the folder as a model directory: each function is a model of it
            made = new_manifest(
                model_name=name, handler=handler, version="1.0", runtime=Runtime.PYTHON
            )
            (target / "MAR-INF").mkdir(exist_ok=True)
            (target / "MAR-INF" / "MANIFEST.json").write_text(made.to_json())
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return _Prepared(name, spec, target, handler)


def _is_registered(state: ServerState, mv: ModelVersion) -> bool:
    return state.registry.models.get(mv.name, {}).get(mv.version) is mv


async def _register_node(
    state: ServerState, wf: Workflow, node: Node, handler: str | None, timeouts: _Timeouts
) -> None:
    """Register one node's model with its workers, into `wf.versions`. Its name must be new:
    a model of that name (a user's, or another workflow's) is a Conflict naming it."""
    s = node.settings
    name = wf.model_name(node.name)
    options = LoadOptions(
        name=name,
        batch_size=s.batch_size,
        max_batch_delay=s.max_batch_delay,
        response_timeout=timeouts.response,
        startup_timeout=timeouts.startup,
        # TorchServe starts `max-workers` workers for a workflow model
        min_workers=s.max_workers,
        max_workers=s.max_workers,
    )
    if node.url is None:
        options = replace(options, handler=f"{handler}:{node.name}", trusted=True)
        url = str(wf.directory)
    else:
        url = node.url
        if download.is_remote(url):  # as `POST /models` with a URL: model API and allowed_urls
            state.require_model_api()
    models = state.workflows.models
    if name in models or name in state.registry.models:
        raise Conflict(f"Model {name} is already registered")
    models.add(name)
    try:
        if download.is_remote(url):
            url = await download.fetch(state.config, url)
        wf.versions[node.name] = await state.registry.load(url, options, new_name=True)
    except BaseException:
        models.discard(name)
        raise


@dataclass(frozen=True)
class _Timeouts:
    response: float | None
    startup: float | None


async def _remove_models(state: ServerState, wf: Workflow, timeout: float | None) -> None:
    """Unregister the models `wf` registered, all at once (each lets its queued requests
    finish for up to `timeout` seconds; None: at once), and free their names as each is
    gone; then remove its folder."""

    async def remove(mv: ModelVersion) -> None:
        try:
            if _is_registered(state, mv):  # else unregistered by hand through the model API
                if timeout is None:
                    await state.registry.unload(mv)
                else:
                    await state.registry.unregister(mv, timeout)
        finally:
            state.workflows.models.discard(mv.name)

    mvs = list(wf.versions.values())
    results = await asyncio.gather(*(remove(mv) for mv in mvs), return_exceptions=True)
    for mv, result in zip(mvs, results, strict=True):
        if isinstance(result, Exception):
            log.error("workflow %s: unregistering %s failed", wf.name, mv.name,
                      exc_info=(type(result), result, result.__traceback__))  # fmt: skip
    await asyncio.to_thread(shutil.rmtree, wf.directory, True)


async def _roll_back(state: ServerState, wf: Workflow) -> None:
    """Undo a registration that failed or was cancelled; runs to its end even if the caller
    is cancelled again (a task of its own, held by `state.track`)."""
    cleanup = asyncio.ensure_future(_remove_models(state, wf, None))
    state.track(cleanup)
    await asyncio.shield(cleanup)


async def register(
    state: ServerState,
    url: str | None,
    name: str | None,
    response_timeout: float | None = None,
    startup_timeout: float | None = None,
) -> str:
    """Register a workflow and its models, with workers; TorchServe's status text. A failed
    or cancelled registration unregisters what it registered."""
    if not url:
        raise BadRequest("Parameter url is required.")
    path = resolve(state.config, url)
    cfg = state.config
    work_dir = state.registry.work_dir
    prepared = await asyncio.to_thread(
        _prepare, path, work_dir, cfg.max_archive_expanded_size, name
    )
    workflows = state.workflows
    wf = Workflow(prepared.name, url, prepared.spec, prepared.directory)
    if wf.name in workflows.known or wf.name in workflows.pending:
        await asyncio.to_thread(shutil.rmtree, wf.directory, True)
        raise Conflict(f"Workflow {wf.name} is already registered.")
    taken = [wf.model_name(n) for n in wf.spec.dag.order]
    taken = [m for m in taken if m in state.registry.models or m in workflows.models]
    if taken:  # never use a model the workflow did not register (checked again as each loads)
        await asyncio.to_thread(shutil.rmtree, wf.directory, True)
        raise Conflict(f"Workflow {wf.name}: model {taken[0]} is already registered")
    workflows.pending.add(wf.name)
    nodes = list(wf.spec.dag.nodes.values())
    try:
        timeouts = _Timeouts(response_timeout, startup_timeout)
        results = await asyncio.gather(
            *(_register_node(state, wf, n, prepared.handler, timeouts) for n in nodes),
            return_exceptions=True,
        )
        failures = []
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, TsctlError):
                failures.append(f"Workflow Node {node.name} failed to register. Details: {result}")
            elif isinstance(result, BaseException):
                log.error("workflow %s node %s failed to register", wf.name, node.name,
                          exc_info=(type(result), result, result.__traceback__))  # fmt: skip
                failures.append(f"Workflow Node {node.name} failed to register. Check error logs.")
        if failures:
            raise StartFailed(
                f"Workflow {wf.name} has failed to register. Failures: [{', '.join(failures)}]"
            )
    except BaseException:
        await _roll_back(state, wf)
        raise
    finally:
        workflows.pending.discard(wf.name)
    workflows.known[wf.name] = wf
    log.info("workflow %s registered (%d nodes)", wf.name, len(nodes))
    return f"Workflow {wf.name} has been registered and scaled successfully."


async def unregister(state: ServerState, name: str) -> str:
    """Unregister a workflow and its models, together (their queued requests finish first).
    The name stays taken until they are gone."""
    workflows = state.workflows
    wf = workflows.get(name)
    del workflows.known[name]
    workflows.pending.add(name)
    try:
        await _remove_models(state, wf, state.config.unregister_model_timeout)
    finally:
        workflows.pending.discard(name)
    return f'Workflow "{name}" unregistered'


def list_workflows(state: ServerState, limit: int, start: int) -> dict[str, Any]:
    """TorchServe's list: sorted by name, pages of at most 100."""
    if limit > 100 or limit < 0:
        limit = 100
    start = max(start, 0)
    names = sorted(state.workflows.known)
    page = names[start : start + limit]
    doc: dict[str, Any] = {}
    if start + limit <= len(names) and start + len(page) < len(names):
        doc["nextPageToken"] = str(start + limit)
    doc["workflows"] = [
        {"workflowName": n, "workflowUrl": state.workflows.known[n].url} for n in page
    ]
    return doc


def describe(state: ServerState, name: str) -> list[dict[str, Any]]:
    wf = state.workflows.get(name)
    s = wf.spec.settings
    return [
        {
            "workflowName": wf.name,
            "workflowUrl": wf.url,
            "minWorkers": s.min_workers,
            "maxWorkers": s.max_workers,
            "batchSize": s.batch_size,
            "maxBatchDelay": s.max_batch_delay,
            "workflowDag": wf.spec.dag_text,
        }
    ]


# -- inference ----------------------------------------------------------------------------


async def _call_node(
    state: ServerState,
    wf: Workflow,
    node: Node,
    parts: list[Part],
    headers: Any,
    request_id: str,
) -> bytes:
    """One node's answer, with TorchServe's retries; `WorkflowNodeFailed` naming it. Each try
    is request `{request_id}-{node}-{try}` (model_log ties it to the client's request)."""
    size = sum(len(p.data) for p in parts)
    limit = state.config.max_request_size
    if size > limit:
        problem = f"its input of {size} bytes exceeds max_request_size ({limit})"
        if node.name == wf.spec.dag.start:  # the client's own body
            raise RequestTooLarge(f"Error executing {node.name}: {problem}")
        raise WorkflowNodeFailed(f"Error executing {node.name}: {problem}")
    attempts = node.settings.retry_attempts + 1
    seconds = node.settings.timeout_ms / 1000
    loop = asyncio.get_running_loop()
    mv = wf.versions[node.name]
    problem = ""
    tried = 0
    while tried < attempts:
        tried += 1
        try:
            if not _is_registered(state, mv):  # unregistered (by hand, or with the workflow)
                raise ModelNotFound(f"Model not found: {mv.name}")
            rid = f"{request_id}-{node.name}-{tried}"
            request = InferenceRequest(rid, parts, headers, loop.time())
            pending = Pending(mv, request, None)
            try:
                answer: Response = await asyncio.wait_for(pending.result(), seconds)
            except TimeoutError:
                raise InferenceTimeout(
                    f"no answer within timeout-ms ({node.settings.timeout_ms})"
                ) from None
            if answer.status >= 400:
                raise WorkflowNodeFailed(f"it answered status {answer.status}")
            return bytes(answer.body)
        except TsctlError as exc:
            problem = exc.message
            log.warning("workflow %s node %s failed (attempt %d of %d): %s",
                        wf.name, node.name, tried, attempts, problem)  # fmt: skip
            if isinstance(exc, ModelNotFound):
                break
    shown = "1 attempt" if tried == 1 else f"{tried} attempts"
    raise WorkflowNodeFailed(
        f"Failed to execute workflow Node after {shown}: Error executing {node.name}: {problem}"
    )


#: above this many bytes of last nodes' outputs, their merge runs in a thread
_MERGE_ON_LOOP = 64 << 10


async def run(
    state: ServerState, name: str, parts: list[Part], headers: Any, request_id: str
) -> Response:
    """Run one request (`request_id`, the client's) through workflow `name`'s DAG; its
    answer."""
    wf = state.workflows.get(name)
    dag = wf.spec.dag
    inputs: dict[str, list[Part]] = {dag.start: list(parts)}
    waiting = {n: len(dag.parents[n]) for n in dag.order}
    leaves: dict[str, bytes] = {}
    running: dict[asyncio.Task[bytes], str] = {}

    def launch(node: str) -> None:
        call = _call_node(state, wf, dag.nodes[node], inputs.pop(node), headers, request_id)
        running[asyncio.ensure_future(call)] = node

    launch(dag.start)
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                node = running.pop(task)
                output = task.result()
                children = dag.children[node]
                if not children:
                    leaves[node] = output
                for child in children:
                    named = "body" if len(dag.parents[child]) == 1 else node
                    inputs.setdefault(child, []).append(Part(named, "", output))
                    waiting[child] -= 1
                    if waiting[child] == 0:
                        launch(child)
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
    limit = state.config.max_response_size
    if len(dag.leaves) == 1:
        return Response(200, "application/json", leaves[dag.leaves[0]])
    if sum(len(b) for b in leaves.values()) <= _MERGE_ON_LOOP:
        return _merge(dag.leaves, leaves, limit)
    return await asyncio.to_thread(_merge, dag.leaves, leaves, limit)


def _merge(order: tuple[str, ...], leaves: dict[str, bytes], limit: int) -> Response:
    """Several last nodes' outputs as one JSON object by node name: each is checked to be
    JSON and spliced in as its bytes (not parsed into objects and written again)."""
    pieces: list[bytes] = []
    for node in order:
        raw = leaves[node]
        try:
            json.loads(raw.decode("utf-8"))  # UTF-8 only: the bytes are spliced as they are
        except ValueError:
            raise WorkflowNodeFailed(
                f"Error executing {node}: its output is not JSON, and a workflow with several "
                "last nodes answers a JSON object of their outputs"
            ) from None
        pieces.append(json.dumps(node).encode() + b": " + raw.strip())
    body = b"{" + b", ".join(pieces) + b"}"
    if len(body) > limit:
        raise WorkflowNodeFailed(f"the workflow's answer exceeds max_response_size ({limit})")
    return Response(200, "application/json", body)
