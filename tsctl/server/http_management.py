"""The REST management API (TorchServe's paths and JSON shapes). Event-loop only.

This issue's part: listing and describing models, which `tsctl serve status` uses.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import tornado.web

from tsctl.errors import BadRequest
from tsctl.server.http_common import ApiHandler, NotFoundHandler, log_request
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState


def describe(mv: ModelVersion) -> dict[str, Any]:
    workers = [
        {
            "id": w.worker_id.split("-", 1)[0],
            "startTime": datetime.fromtimestamp(w.started_at, timezone.utc).isoformat(),
            "status": "READY" if w.state in ("READY", "BUSY") else w.state,
            "memoryUsage": int(w.rss_mb() * (1 << 20)),
            "pid": w.pid,
            "gpu": False,
            "gpuUsage": "N/A",
        }
        for w in mv.pool.workers
    ]
    return {
        "modelName": mv.name,
        "modelVersion": mv.version,
        "modelUrl": mv.url,
        "runtime": mv.manifest.get("runtime", "python"),
        "minWorkers": mv.pool.target,
        "maxWorkers": max(mv.max_workers, mv.pool.target),
        "batchSize": mv.batch_size,
        "maxBatchDelay": mv.max_batch_delay,
        "responseTimeout": mv.response_timeout,
        "startupTimeout": mv.startup_timeout,
        "loadedAtStartup": mv.loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {
            "remainingCapacity": mv.queue.capacity - len(mv.queue),
            "pendingRequests": len(mv.queue),
        },
    }


class ModelsHandler(ApiHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def get(self) -> None:
        registry = self.state.registry
        try:
            limit = int(self.get_query_argument("limit", "100"))
            start = int(self.get_query_argument("next_page_token", "0") or 0)
        except ValueError:
            raise BadRequest("limit and next_page_token must be integers") from None
        names = sorted(registry.models)
        page = names[start : start + limit] if limit > 0 else names[start:]
        doc: dict[str, Any] = {
            "models": [{"modelName": n, "modelUrl": registry.get(n).url} for n in page]
        }
        if start + len(page) < len(names):
            doc["nextPageToken"] = str(start + len(page))
        self.write_json(doc)


class ModelHandler(ApiHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def get(self, name: str, version: str | None = None) -> None:
        registry = self.state.registry
        if version == "all":
            registry.get(name)
            found = list(registry.models[name].values())
        else:
            found = [registry.get(name, version)]
        self.write_json([describe(mv) for mv in found])


def make_app(state: ServerState) -> tornado.web.Application:
    kwargs = {"state": state}
    return tornado.web.Application(
        [
            (r"/models", ModelsHandler, kwargs),
            (r"/models/([^/]+)", ModelHandler, kwargs),
            (r"/models/([^/]+)/([^/]+)", ModelHandler, kwargs),
        ],
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        state=state,
    )
