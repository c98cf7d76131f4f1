"""Model management operations, shared by the REST and gRPC management APIs.

Protocol-neutral and event-loop only. Each operation checks its parameters, changes the
registry, writes a snapshot, and returns an `Outcome`: TorchServe's status message (its
`{"status": ...}` text) and whether the work goes on in the background; each API decides how to
answer it. The describe documents (TorchServe's JSON shape) are built here too, for both APIs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsctl.errors import (
    BadRequest,
    Conflict,
    InvalidModelVersion,
    ServiceUnavailable,
    StartFailed,
    TsctlError,
)
from tsctl.ipc.messages import FailureKind
from tsctl.server import download
from tsctl.server.registry import ModelVersion
from tsctl.server.settings import LoadOptions, ModelSettings, check_workers
from tsctl.server.state import ServerState
from tsctl.server.workers.pool import error_for, restart_delay
from tsctl.validation import describe

log = logging.getLogger("tsctl.server")


@dataclass(frozen=True)
class Outcome:
    """What an operation reports: TorchServe's status text, and `accepted` when the work goes
    on after the answer (REST answers that 202)."""

    message: str
    accepted: bool = False


class RegisterParams(BaseModel):
    """`POST /models` parameters (query string or JSON body), TorchServe's names."""

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    url: str | None = None
    model_name: str | None = None
    handler: str | None = None
    runtime: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    max_batch_delay: float | None = Field(default=None, ge=0)
    initial_workers: int | None = Field(default=None, ge=0)
    synchronous: bool = True
    response_timeout: float | None = Field(default=None, gt=0)
    startup_timeout: float | None = Field(default=None, gt=0)


class ScaleParams(BaseModel):
    """`PUT /models/{name}` parameters."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    min_worker: int | None = Field(default=None, ge=0)
    max_worker: int | None = Field(default=None, ge=0)
    synchronous: bool = False
    timeout: float = -1


def parse(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """Validate request parameters; a bad one is a 400 that names it and its value."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BadRequest(describe(exc, "parameter")) from None


def list_models(state: ServerState, limit: int, start: int) -> dict[str, Any]:
    """`{"nextPageToken"?, "models": [...]}` sorted by name; `limit` <= 0 means all."""
    registry = state.registry
    names = sorted(registry.models)
    page = names[start : start + limit] if limit > 0 else names[start:]
    doc: dict[str, Any] = {
        "models": [{"modelName": n, "modelUrl": registry.get(n).url} for n in page]
    }
    if start + len(page) < len(names):
        doc = {"nextPageToken": str(start + len(page)), **doc}
    return doc


def require_model_api(state: ServerState) -> None:
    state.require_model_api()


async def register(state: ServerState, params: RegisterParams) -> Outcome:
    require_model_api(state)
    if not params.url:
        raise BadRequest("Parameter url is required.")
    cfg = state.config
    check_workers("initial_workers", params.initial_workers, cfg.max_workers_per_model)
    # TorchServe gives an API-registered model 0 workers unless initial_workers is passed;
    # tsctl starts default_workers_per_model (at least 1) so the model can answer at once
    workers = params.initial_workers
    options = LoadOptions(
        name=params.model_name,
        handler=params.handler,
        runtime=params.runtime,
        batch_size=params.batch_size,
        max_batch_delay=params.max_batch_delay,
        response_timeout=params.response_timeout,
        startup_timeout=params.startup_timeout,
        min_workers=workers,
    )
    registry = state.registry
    url = params.url
    if download.is_remote(url):
        url = await download.fetch(cfg, url)
    mv = await registry.add(url, options)
    if state.workflows.owns(mv.name):  # checked as it is added: its versions are a workflow's
        await registry.unload(mv)
        raise Conflict(f"Model {mv.name} belongs to a workflow; unregister the workflow first")
    if workers is None and mv.min_workers == 0:
        mv.min_workers = max(1, min(cfg.default_workers_per_model, cfg.max_workers_per_model))
        mv.max_workers = max(mv.max_workers, mv.min_workers)
    count = mv.min_workers
    model = f'Model "{mv.name}" Version: {mv.version}'
    registered = f"{model} registered with {count} initial workers"
    if not params.synchronous and count > 0:
        # TorchServe's answer once the archive is loaded: the workers start after it
        state.track(asyncio.ensure_future(_start_in_background(state, mv, count)))
        state.snapshot("snapshot")
        return Outcome("Processing worker updates...", accepted=True)
    try:
        await mv.pool.scale(count)
    except TsctlError as exc:
        log.error("starting workers for %s %s failed: %s", mv.name, mv.version, exc)
        if workers is None:  # not asked for (TorchServe's default is none): keep the model
            mv.min_workers = 0
            await mv.pool.scale(0)
            state.snapshot("snapshot")
            return Outcome(
                f"{model} registered with 0 initial workers: starting "
                f"its default workers failed ({exc.message}). Use scale workers API to add "
                "workers for the model."
            )
        await registry.unload(mv)
        raise StartFailed(
            f"Failed to start workers for model {mv.name} version: {mv.version}: {exc.message}"
        ) from None
    state.snapshot("snapshot")
    if count == 0:
        registered += ". Use scale workers API to add workers for the model."
    return Outcome(registered)


#: how long the workers of a model registered with `synchronous=false` are retried when they
#: fail to start (TorchServe's `maxRetryTimeoutInSec` default)
START_RETRY_SECONDS = 300.0


async def _start_in_background(state: ServerState, mv: ModelVersion, count: int) -> None:
    """Start a model's workers after the 202 answer; as TorchServe, a failed start is tried
    again with the pool's backoff (1, 2, 4, ... s) for `START_RETRY_SECONDS`. The server log
    names the try, not the error: the handler's error and traceback are in model_log.log."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_RETRY_SECONDS
    failures = 0
    while True:
        try:
            await mv.pool.scale(count)
            return
        except TsctlError:
            if state.registry.models.get(mv.name, {}).get(mv.version) is not mv:
                log.info("%s %s was unregistered while its workers started", mv.name, mv.version)
                return
            failures += 1
            delay = max(1.0, restart_delay(failures))
            if loop.time() + delay > deadline:
                log.error(
                    "starting workers for %s %s failed %d times; no more tries (see model_log.log)",
                    mv.name, mv.version, failures,
                )  # fmt: skip
                return
            log.error(
                "starting workers for %s %s failed (try %d; see model_log.log); next try in %.0f s",
                mv.name, mv.version, failures, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)


async def scale(state: ServerState, name: str, version: str | None, params: ScaleParams) -> Outcome:
    """TorchServe's rule: `min_worker` defaults to 1 and `max_worker` to `min_worker`."""
    mv = state.registry.get(name, version)
    low = params.min_worker if params.min_worker is not None else 1
    high = params.max_worker if params.max_worker is not None else low
    if high < low:
        raise BadRequest("max_worker cannot be less than min_worker.")
    cap = state.config.max_workers_per_model
    check_workers("min_worker", params.min_worker, cap)
    check_workers("max_worker", params.max_worker, cap)
    mv.min_workers, mv.max_workers = low, high
    suffix = f", version: {version}" if version else ""
    if not params.synchronous:
        state.track(asyncio.ensure_future(_scale_in_background(state, mv, low)))
        return Outcome("Processing worker updates...", accepted=True)
    await mv.pool.scale(low)
    state.snapshot("snapshot")
    return Outcome(f"Workers scaled to {low} for model: {name}{suffix}")


async def _scale_in_background(state: ServerState, mv: ModelVersion, count: int) -> None:
    try:
        await mv.pool.scale(count)
    except TsctlError as exc:
        log.error("scaling %s %s failed: %s", mv.name, mv.version, exc)
    state.snapshot("snapshot")


async def unregister(state: ServerState, name: str, version: str | None) -> Outcome:
    require_model_api(state)
    registry = state.registry
    mv = registry.get(name, version)
    # no version means the default one (TorchServe's rule), which stays while others exist
    if registry.default[name] == mv.version and len(registry.models[name]) > 1:
        raise InvalidModelVersion(f"Cannot remove default version for model {name}")
    await registry.unregister(mv, state.config.unregister_model_timeout)
    state.snapshot("snapshot")
    return Outcome(f'Model "{name}" unregistered')


def set_default(state: ServerState, name: str, version: str) -> Outcome:
    state.registry.set_default(name, version)
    state.snapshot("snapshot")
    return Outcome(f'Default version successfully updated for model "{name}" to "{version}"')


async def customized(mv: ModelVersion) -> Any:
    """The handler's `describe_handle()` answer, from one of the model's workers, as TorchServe
    puts it in a description: the JSON object it returned, or `{}` when it is not one; None
    when the handler has no `describe_handle`."""
    ready = [w for w in mv.pool.workers if w.state.serving]
    if not ready:
        raise ServiceUnavailable(
            f'Model "{mv.name}" has no worker to serve describe request. '
            "Please use scale workers API to add workers."
        )
    answer = await ready[0].describe()
    if answer.failure is not None:
        if answer.failure.kind is FailureKind.NOT_SUPPORTED:
            return None
        raise error_for(answer.failure)
    try:
        found = json.loads(bytes(answer.body))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _iso_millis(stamp: float) -> str:
    """TorchServe's timestamps: `2026-12-02T05:55:43.353Z`."""
    moment = datetime.fromtimestamp(stamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def describe_model(mv: ModelVersion) -> dict[str, Any]:
    """One model version as TorchServe's describe API shows it."""
    workers = [
        {
            "id": w.worker_id.split("-", 1)[0],
            "startTime": _iso_millis(w.started_at),
            "status": "READY" if w.state.serving else w.state.value,
            "memoryUsage": int(w.rss_mb() * (1 << 20)),
            "pid": w.pid,
            "gpu": w.spec.gpu_id is not None,
            "gpuUsage": "N/A",
        }
        for w in [*mv.pool.workers, *mv.pool.starting]  # as TorchServe: starting ones too
    ]
    # validated when the model loaded: model parallelism and stateful sessions as configured
    yaml = ModelSettings.model_validate(mv.yaml_config)
    stateful = yaml.sequence_batching
    return {
        "modelName": mv.name,
        "modelVersion": mv.version,
        "modelUrl": mv.url,
        "runtime": mv.manifest.get("runtime", "python"),
        **mv.settings(),
        # TorchServe 0.12's other settings, at the values tsctl runs with (it has no retry
        # timeout, client timeout, job tickets or venvs to configure)
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": 0,
        "parallelType": yaml.parallel_type or "",
        # torchrun's nproc-per-node when only that section gives it (TorchServe's report)
        "parallelLevel": yaml.parallel_level
        or (yaml.torchrun.nproc_per_node if yaml.torchrun else 0),
        "deviceType": "gpu" if any(w.spec.gpu_id is not None for w in mv.pool.workers) else "cpu",
        "continuousBatching": yaml.continuous_batching,
        "useJobTicket": False,
        "useVenv": False,
        "stateful": stateful,
        "sequenceMaxIdleMSec": yaml.sequence_max_idle_msec if stateful else 0,
        "sequenceTimeoutMSec": yaml.sequence_timeout_msec if stateful else 0,
        "maxNumSequence": yaml.max_num_sequence if stateful else 0,
        "maxSequenceJobQueueSize": yaml.max_sequence_job_queue_size if stateful else 0,
        "loadedAtStartup": mv.loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {
            "remainingCapacity": mv.queue.capacity - len(mv.queue),
            "pendingRequests": len(mv.queue),
        },
    }


async def describe_models(
    state: ServerState, name: str, version: str | None, with_custom: bool
) -> list[dict[str, Any]]:
    """TorchServe's describe list for one version, the default one, or `all`; with
    `with_custom`, each handler's own `describe_handle()` answer too."""
    registry = state.registry
    if version == "all":
        registry.get(name)
        found = list(registry.models[name].values())
    else:
        found = [registry.get(name, version)]
    described = [describe_model(mv) for mv in found]
    if with_custom:
        for doc, mv in zip(described, found, strict=True):
            custom = await customized(mv)
            if custom is not None:
                doc["customizedMetadata"] = custom
    return described
