"""Model management operations, shared by the REST (and later gRPC) management APIs.

Runs on the daemon's event loop. Each operation checks its parameters, changes the registry,
writes a snapshot, and returns TorchServe's status message (its `{"status": ...}` text) with
the HTTP status to answer with.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsctl.errors import (
    BadRequest,
    InvalidModelVersion,
    MethodNotAllowed,
    PredictionFailed,
    ServiceUnavailable,
    TsctlError,
)
from tsctl.server import download
from tsctl.server.api.rest import NOT_ALLOWED_MESSAGE
from tsctl.server.registry import LoadOptions, ModelVersion
from tsctl.server.state import ServerState
from tsctl.validation import describe

log = logging.getLogger("tsctl.server")


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
    if not state.config.enable_model_api:
        raise MethodNotAllowed(NOT_ALLOWED_MESSAGE)


async def register(state: ServerState, params: RegisterParams) -> tuple[int, str]:
    require_model_api(state)
    if not params.url:
        raise BadRequest("Parameter url is required.")
    cfg = state.config
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
    if workers is None and mv.min_workers == 0:
        mv.min_workers = max(1, cfg.default_workers_per_model)
        mv.max_workers = max(mv.max_workers, mv.min_workers)
    count = mv.min_workers
    registered = f'Model "{mv.name}" Version: {mv.version} registered with {count} initial workers'
    if not params.synchronous:
        state.track(asyncio.ensure_future(_start_in_background(state, mv, count)))
        state.snapshot("snapshot")
        return 202, registered
    try:
        await mv.pool.scale(count)
    except TsctlError as exc:
        log.error("starting workers for %s %s failed: %s", mv.name, mv.version, exc)
        await registry.unload(mv)
        raise _StartFailed(
            f"Failed to start workers for model {mv.name} version: {mv.version}: {exc.message}"
        ) from None
    state.snapshot("snapshot")
    if count == 0:
        registered += ". Use scale workers API to add workers for the model."
    return 200, registered


class _StartFailed(TsctlError):
    http_status = 500
    type_name = "InternalServerException"


async def _start_in_background(state: ServerState, mv: ModelVersion, count: int) -> None:
    try:
        await mv.pool.scale(count)
    except TsctlError as exc:
        log.error("starting workers for %s %s failed: %s", mv.name, mv.version, exc)


async def scale(
    state: ServerState, name: str, version: str | None, params: ScaleParams
) -> tuple[int, str]:
    mv = state.registry.get(name, version)
    low = params.min_worker if params.min_worker is not None else mv.min_workers
    high = params.max_worker if params.max_worker is not None else max(low, mv.max_workers)
    if high < low:
        raise BadRequest("max_worker cannot be less than min_worker.")
    mv.min_workers, mv.max_workers = low, high
    suffix = f", version: {version}" if version else ""
    if not params.synchronous:
        state.track(asyncio.ensure_future(_scale_in_background(state, mv, low)))
        return 202, "Processing worker updates..."
    await mv.pool.scale(low)
    state.snapshot("snapshot")
    return 200, f"Workers scaled to {low} for model: {name}{suffix}"


async def _scale_in_background(state: ServerState, mv: ModelVersion, count: int) -> None:
    try:
        await mv.pool.scale(count)
    except TsctlError as exc:
        log.error("scaling %s %s failed: %s", mv.name, mv.version, exc)
    state.snapshot("snapshot")


async def unregister(state: ServerState, name: str, version: str | None) -> tuple[int, str]:
    require_model_api(state)
    registry = state.registry
    mv = registry.get(name, version)
    versions = registry.models[name]
    if version is not None and registry.default[name] == version and len(versions) > 1:
        raise InvalidModelVersion(f"Cannot remove default version for model {name}")
    await registry.unregister(mv, state.config.unregister_model_timeout)
    state.snapshot("snapshot")
    return 200, f'Model "{name}" unregistered'


def set_default(state: ServerState, name: str, version: str) -> tuple[int, str]:
    state.registry.set_default(name, version)
    state.snapshot("snapshot")
    return 200, f'Default version successfully updated for model "{name}" to "{version}"'


async def customized(mv: ModelVersion) -> Any:
    """The handler's `describe_handle()` answer, from one of the model's workers, as TorchServe
    puts it in a description: the JSON object it returned, or `{}` when it is not one; None
    when the handler has no `describe_handle`."""
    ready = [w for w in mv.pool.workers if w.state in ("READY", "BUSY")]
    if not ready:
        raise ServiceUnavailable(
            f'Model "{mv.name}" has no worker to serve describe request. '
            "Please use scale workers API to add workers."
        )
    answer = await ready[0].describe()
    if answer.failure is not None:
        if answer.failure.kind == "NotSupported":
            return None
        raise PredictionFailed(answer.failure.message)
    try:
        found = json.loads(bytes(answer.body))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
