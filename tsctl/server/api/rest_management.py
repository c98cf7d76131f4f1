"""The REST management API (TorchServe's paths and JSON shapes). Event-loop only.

Thin adapters: parameters come from the query string (or a JSON body for registration), the
operations themselves live in `tsctl.server.management`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import tornado.web

from tsctl.errors import BadRequest
from tsctl.server import management
from tsctl.server.api.openapi import management_api_description
from tsctl.server.api.rest import ApiHandler, NotFoundHandler, log_request
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState


def _iso_millis(stamp: float) -> str:
    """TorchServe's timestamps: `2026-12-02T05:55:43.353Z`."""
    moment = datetime.fromtimestamp(stamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def describe(mv: ModelVersion) -> dict[str, Any]:
    workers = [
        {
            "id": w.worker_id.split("-", 1)[0],
            "startTime": _iso_millis(w.started_at),
            "status": "READY" if w.state in ("READY", "BUSY") else w.state,
            "memoryUsage": int(w.rss_mb() * (1 << 20)),
            "pid": w.pid,
            "gpu": w.spec.get("gpu_id") is not None,
            "gpuUsage": "N/A",
        }
        for w in mv.pool.workers
    ]
    return {
        "modelName": mv.name,
        "modelVersion": mv.version,
        "modelUrl": mv.url,
        "runtime": mv.manifest.get("runtime", "python"),
        **mv.settings(),
        # TorchServe 0.12's other settings, at the values tsctl runs with (it has no retry
        # timeout, client timeout, model parallelism, continuous batching, job tickets, venvs
        # or stateful sequences to configure)
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": 0,
        "parallelType": "",
        "parallelLevel": 0,
        "deviceType": "gpu"
        if any(w.spec.get("gpu_id") is not None for w in mv.pool.workers)
        else "cpu",
        "continuousBatching": False,
        "useJobTicket": False,
        "useVenv": False,
        "stateful": False,
        "sequenceMaxIdleMSec": 0,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0,
        "loadedAtStartup": mv.loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {
            "remainingCapacity": mv.queue.capacity - len(mv.queue),
            "pendingRequests": len(mv.queue),
        },
    }


async def describe_models(
    state: ServerState, name: str, version: str | None, customized: bool
) -> list[dict[str, Any]]:
    """TorchServe's describe list for one version, the default one, or `all`; with
    `customized`, each handler's own `describe_handle()` answer too."""
    registry = state.registry
    if version == "all":
        registry.get(name)
        found = list(registry.models[name].values())
    else:
        found = [registry.get(name, version)]
    described = [describe(mv) for mv in found]
    if customized:
        for doc, mv in zip(described, found, strict=True):
            custom = await management.customized(mv)
            if custom is not None:
                doc["customizedMetadata"] = custom
    return described


class ManagementHandler(ApiHandler):
    key_kind = "management"

    def initialize(self, state: ServerState) -> None:
        self.state = state

    def prepare(self) -> None:
        self.state.authorize(self.key_kind, self.request.headers.get("Authorization"))

    def params(self) -> dict[str, Any]:
        """Query parameters (last value wins), then a JSON body's keys on top."""
        values: dict[str, Any] = {
            k: v[-1].decode("utf-8", "replace") for k, v in self.request.query_arguments.items()
        }
        content_type = self.request.headers.get("Content-Type", "")
        if self.request.body and content_type.startswith("application/json"):
            try:
                body = json.loads(self.request.body)
            except ValueError as exc:
                raise BadRequest(f"the JSON body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object of parameters")
            values.update(body)
        return values

    def status(self, result: tuple[int, str]) -> None:
        code, message = result
        self.write_json({"status": message}, code)


class ModelsHandler(ManagementHandler):
    def get(self) -> None:
        try:
            limit = int(self.get_query_argument("limit", "100"))
            start = int(self.get_query_argument("next_page_token", "0") or 0)
        except ValueError:
            raise BadRequest("limit and next_page_token must be integers") from None
        self.write_json(management.list_models(self.state, limit, start))

    async def post(self) -> None:
        params = management.parse(management.RegisterParams, self.params())
        self.status(await management.register(self.state, params))


class ModelHandler(ManagementHandler):
    async def put(self, name: str, version: str | None = None) -> None:
        params = management.parse(management.ScaleParams, self.params())
        self.status(await management.scale(self.state, name, version, params))

    async def delete(self, name: str, version: str | None = None) -> None:
        self.status(await management.unregister(self.state, name, version))

    async def get(self, name: str, version: str | None = None) -> None:
        customized = self.get_query_argument("customized", "false").lower() == "true"
        self.write_json(await describe_models(self.state, name, version, customized))


class SetDefaultHandler(ManagementHandler):
    def put(self, name: str, version: str) -> None:
        self.status(management.set_default(self.state, name, version))


class DescriptionHandler(ManagementHandler):
    def options(self) -> None:
        self.write_json(management_api_description())


class TokenHandler(ManagementHandler):
    """`/token?type=management|inference`: rotate a key (needs the API key)."""

    key_kind = "API"

    def get(self) -> None:
        kind = self.get_query_argument("type", "")
        if self.state.auth is None:
            raise BadRequest("token authorization is disabled on this server")
        if kind not in ("management", "inference"):
            raise BadRequest(f"type must be management or inference, not {kind!r}")
        self.write_json({kind: self.state.auth.rotate(kind)})

    put = post = get


def make_app(state: ServerState) -> tornado.web.Application:
    kwargs = {"state": state}
    return tornado.web.Application(
        [
            (r"/", DescriptionHandler, kwargs),
            (r"/token", TokenHandler, kwargs),
            (r"/models", ModelsHandler, kwargs),
            (r"/models/([^/]+)/([^/]+)/set-default", SetDefaultHandler, kwargs),
            (r"/models/([^/]+)", ModelHandler, kwargs),
            (r"/models/([^/]+)/([^/]+)", ModelHandler, kwargs),
        ],
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        state=state,
    )
