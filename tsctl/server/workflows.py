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
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tsctl.archive.manifest import Runtime, new_manifest
from tsctl.archive.workflow import check_workflow_name, open_workflow
from tsctl.errors import (
    NOT_ALLOWED_MESSAGE,
    BadRequest,
    Conflict,
    InferenceTimeout,
    MethodNotAllowed,
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
from tsctl.server.registry import ModelVersion
from tsctl.server.request import InferenceRequest, Response, new_request_id
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
_MAX_HANDLER_BYTES = 16 << 20


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

    def model_name(self, node: str) -> str:
        return f"{self.name}__{node}"

    @property
    def model_names(self) -> list[str]:
        return [self.model_name(n) for n in self.spec.dag.order]


@dataclass
class Workflows:
    """The registered workflows by name; `pending` holds names being registered."""

    known: dict[str, Workflow] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)

    def get(self, name: str) -> Workflow:
        found = self.known.get(name)
        if found is None:
            raise WorkflowNotFound(f"Workflow not found: {name}")
        return found

    def owns(self, model: str) -> bool:
        """Whether `model` is a node of a workflow, registered or being registered (snapshots
        leave those out)."""
        workflow, _, node = model.partition("__")
        if not node:
            return False
        found = self.known.get(workflow)
        return workflow in self.pending or (found is not None and node in found.spec.dag.nodes)


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
    candidate = named if named.is_absolute() else store / named
    root = Path(os.path.abspath(store))
    if ".." in named.parts or not Path(os.path.abspath(candidate)).is_relative_to(root):
        raise BadRequest(f"Relative path is not allowed in url: {url}")
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


async def _register_node(
    state: ServerState, wf: Workflow, node: Node, handler: str | None, timeouts: _Timeouts
) -> ModelVersion:
    s = node.settings
    options = LoadOptions(
        name=wf.model_name(node.name),
        batch_size=s.batch_size,
        max_batch_delay=s.max_batch_delay,
        response_timeout=timeouts.response,
        startup_timeout=timeouts.startup,
        # TorchServe starts `max-workers` workers for a workflow model
        min_workers=s.max_workers,
        max_workers=s.max_workers,
    )
    registry = state.registry
    if node.url is None:
        options = replace(options, handler=f"{handler}:{node.name}", trusted=True)
        url = str(wf.directory)
    else:
        url = node.url
        if download.is_remote(url):  # as `POST /models` with a URL: model API and allowed_urls
            if not state.config.enable_model_api:
                raise MethodNotAllowed(NOT_ALLOWED_MESSAGE)
            url = await download.fetch(state.config, url)
    mv = await registry.add(url, options)
    try:
        await mv.pool.scale(mv.min_workers)
    except BaseException:
        await registry.unload(mv)
        raise
    return mv


@dataclass(frozen=True)
class _Timeouts:
    response: float | None
    startup: float | None


async def register(
    state: ServerState,
    url: str | None,
    name: str | None,
    response_timeout: float | None = None,
    startup_timeout: float | None = None,
) -> str:
    """Register a workflow and its models, with workers; TorchServe's status text."""
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
    workflows.pending.add(wf.name)
    try:
        nodes = list(wf.spec.dag.nodes.values())
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
            for result in results:
                if isinstance(result, ModelVersion):
                    await state.registry.unload(result)
            await asyncio.to_thread(shutil.rmtree, wf.directory, True)
            raise StartFailed(
                f"Workflow {wf.name} has failed to register. Failures: [{', '.join(failures)}]"
            )
        workflows.known[wf.name] = wf
    finally:
        workflows.pending.discard(wf.name)
    log.info("workflow %s registered (%d nodes)", wf.name, len(nodes))
    return f"Workflow {wf.name} has been registered and scaled successfully."


async def unregister(state: ServerState, name: str) -> str:
    """Unregister a workflow and its models (their queued requests finish first)."""
    wf = state.workflows.get(name)
    del state.workflows.known[name]
    for model in wf.model_names:
        try:
            mv = state.registry.get(model)
        except ModelNotFound:  # unregistered by hand through the model API
            continue
        await state.registry.unregister(mv, state.config.unregister_model_timeout)
    await asyncio.to_thread(shutil.rmtree, wf.directory, True)
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
    state: ServerState, wf: Workflow, node: Node, parts: list[Part], headers: Any
) -> bytes:
    """One node's answer, with TorchServe's retries; `WorkflowNodeFailed` naming it."""
    size = sum(len(p.data) for p in parts)
    limit = state.config.max_request_size
    if size > limit:
        raise RequestTooLarge(
            f"Error executing {node.name}: its input of {size} bytes exceeds "
            f"max_request_size ({limit})"
        )
    attempts = node.settings.retry_attempts + 1
    seconds = node.settings.timeout_ms / 1000
    loop = asyncio.get_running_loop()
    problem = ""
    for attempt in range(attempts):
        try:
            mv = state.registry.get(wf.model_name(node.name))
            request = InferenceRequest(new_request_id(None), parts, headers, loop.time())
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
                        wf.name, node.name, attempt + 1, attempts, problem)  # fmt: skip
            if isinstance(exc, ModelNotFound):
                break
    raise WorkflowNodeFailed(
        f"Failed to execute workflow Node after {attempts} attempts: "
        f"Error executing {node.name}: {problem}"
    )


async def run(state: ServerState, name: str, parts: list[Part], headers: Any) -> Response:
    """Run one request through workflow `name`'s DAG; its answer."""
    wf = state.workflows.get(name)
    dag = wf.spec.dag
    inputs: dict[str, list[Part]] = {dag.start: list(parts)}
    waiting = {n: len(dag.parents[n]) for n in dag.order}
    leaves: dict[str, bytes] = {}
    running: dict[asyncio.Task[bytes], str] = {}

    def launch(node: str) -> None:
        call = _call_node(state, wf, dag.nodes[node], inputs.pop(node), headers)
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
    return _answer(state, dag.leaves, leaves)


def _answer(state: ServerState, order: tuple[str, ...], leaves: dict[str, bytes]) -> Response:
    if len(order) == 1:
        return Response(200, "application/json", leaves[order[0]])
    merged: dict[str, Any] = {}
    for node in order:
        try:
            merged[node] = json.loads(leaves[node])
        except ValueError:
            raise WorkflowNodeFailed(
                f"Error executing {node}: its output is not JSON, and a workflow with several "
                "last nodes answers a JSON object of their outputs"
            ) from None
    body = json.dumps(merged).encode()
    limit = state.config.max_response_size
    if len(body) > limit:
        raise WorkflowNodeFailed(f"the workflow's answer exceeds max_response_size ({limit})")
    return Response(200, "application/json", body)
