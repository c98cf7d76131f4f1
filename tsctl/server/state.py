"""The daemon's shared state, handed to every API adapter. Event-loop only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import cached_property

from tsctl.errors import NOT_ALLOWED_MESSAGE, MethodNotAllowed, ModelNotFound, StartingUp
from tsctl.plugins.api import Authorizer, RequestInfo
from tsctl.server import snapshot
from tsctl.server.auth import TokenAuth, TokenAuthorizer, run_chain
from tsctl.server.config import ServerConfig
from tsctl.server.plugins import ServerPlugins
from tsctl.server.registry import ModelVersion, Registry
from tsctl.server.telemetry.logs import LineLog
from tsctl.server.telemetry.metric_log import MetricLog
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workflows import Workflows


@dataclass
class ServerState:
    config: ServerConfig
    registry: Registry
    #: the Prometheus registry the metrics API renders
    metrics: Metrics
    #: the system metrics, sampled every `metric_time_interval`
    metric_log: MetricLog
    access_log: LineLog
    auth: TokenAuth | None = None
    #: the loaded plugins (`tsctl.server.plugins`), by kind
    plugins: ServerPlugins = field(default_factory=ServerPlugins)
    started_at: float = 0.0
    draining: bool = False
    #: true from start until the start-up models are registered and their workers started
    #: (or left out): the server is not ready meanwhile (`tsctl.server.readiness`)
    loading_startup_models: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    #: the registered workflows (`tsctl.server.workflows`)
    workflows: Workflows = field(default_factory=Workflows)

    def track(self, task: asyncio.Future[None]) -> None:
        """Hold a background task until it is done (the loop keeps only weak references)."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def snapshot(self, kind: str) -> None:
        """Record the models' state (after every change), unless snapshots are off."""
        if self.config.no_config_snapshots:
            return
        models = snapshot.models_of(self.registry)
        if self.workflows.models:  # a workflow's models are not snapshotted (TorchServe's way)
            models = [m for m in models if not self.workflows.owns(m.name)]
        snapshot.write(self.config, models, kind)

    @cached_property
    def cors(self) -> dict[str, str]:
        """CORS headers for every answer, from the cors_allowed_* settings."""
        c = self.config
        pairs = (
            ("Access-Control-Allow-Origin", c.cors_allowed_origin),
            ("Access-Control-Allow-Methods", c.cors_allowed_methods),
            ("Access-Control-Allow-Headers", c.cors_allowed_headers),
        )
        return {name: value for name, value in pairs if value}

    @cached_property
    def authorizers(self) -> tuple[Authorizer, ...]:
        """The authorization chain (`tsctl.server.auth`): the token authorizer when token
        authorization is on, then the plugins'. Made at the first request, once start-up has
        set `auth` and `plugins`. Adapters call `authorize` only when it is not empty (the
        hot path without authorizers builds no `RequestInfo`)."""
        token = (TokenAuthorizer(self.auth),) if self.auth is not None else ()
        return (*token, *self.plugins.authorizers)

    def authorize(self, request: RequestInfo) -> None:
        """The one authorization check every API adapter calls: returns when every
        authorizer allows, else raises the error that answers the request."""
        run_chain(self.authorizers, request)

    def require_model_api(self) -> None:
        """Registering a model from the API (or a workflow's model from a URL) needs
        `enable_model_api`."""
        if not self.config.enable_model_api:
            raise MethodNotAllowed(NOT_ALLOWED_MESSAGE)

    def model_for_inference(self, name: str, version: str | None) -> ModelVersion:
        """The model version a prediction goes to. While the start-up models are still
        being registered, a name not known yet is `StartingUp` (503, Retry-After), not 404."""
        try:
            return self.registry.get(name, version)
        except ModelNotFound:
            if self.loading_startup_models:
                raise StartingUp(
                    f"Model not found: {name} (the server is still loading its models)"
                ) from None
            raise

    def answered(self, status: int) -> None:
        """Count an answer (`Requests2XX`, ...: metrics API and/or ts_metrics.log)."""
        self.metrics.count_status(status)

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self.idle.set()
