"""The three plugin interfaces: what a plugin author writes against (docs/plugins.md).

A plugin is an object with a `name` that subclasses one of `Endpoint`, `Authorizer` or
`BatchingStrategy`. Installed packages name theirs as entry points in the group
`tsctl.plugins`; a folder given with `--plugins-path` (setting `plugins_path`) holds `.py`
files or packages whose module lists them in `PLUGINS` (`tsctl.plugins.loader`). tsctl's own
token authorization and its default batching are implemented on the same interfaces.

Thread and loop rules (every method here is called on the daemon's event loop):

- `Authorizer.authorize` is called for every request before it is routed to a model, so it
  must be quick and must not block (no network or disk I/O): read what it needs at `setup`.
- `Endpoint.handle` may be a coroutine (run on the loop: await, never block) or a plain
  function (run in a worker thread, so it may block; it must not touch the loop's objects).
  Either way it is given the request's deadline (`response_timeout`): past it the client gets
  504 and the plugin's result is dropped.
- `BatchingStrategy.next_batch` is a coroutine on the loop: it waits with the queue's own
  waits, never with `time.sleep`; `ready_batch` is plain and must not wait at all.
  `BatchingStrategy.configure` is the exception: it runs while a model is registered, in a
  thread (the archive is read there), so it only checks options and builds an instance.

An exception from a plugin fails the one request (500, the plugin named in ts_log.log), or the
one batch for a strategy (its worker lives on); it never stops the server.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tsctl.server.batching import ModelQueue
    from tsctl.server.request import Job

#: the APIs a request can arrive on (gRPC calls carry the API of their service)
APIS = ("inference", "management", "metrics")


@dataclass(frozen=True)
class RequestInfo:
    """What an authorizer (and an endpoint) knows of a request.

    `api`: "inference", "management" or "metrics". `method`: the HTTP method, or for gRPC the
    RPC's name ("Predictions", "RegisterModel", "ModelInfer", ...). `path`: the URL path, or for
    gRPC the full method path ("/org.pytorch.serve.grpc.inference.InferenceAPIsService/
    Predictions"). `headers`: lower-cased names (gRPC: the call's metadata). `peer`: the
    client's address as "host:port" ("" when unknown). `model`: the model the request is for,
    when there is one. `protocol`: "http" or "grpc"."""

    api: str
    method: str
    path: str
    headers: Mapping[str, str]
    peer: str = ""
    model: str | None = None
    protocol: str = "http"


@dataclass(frozen=True)
class Denied:
    """An authorizer's refusal: the status (HTTP; gRPC maps it: 401 UNAUTHENTICATED, 403
    PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED, else PERMISSION_DENIED) and a message the client
    sees."""

    status: int = 403
    message: str = "Forbidden"


@dataclass(frozen=True)
class EndpointRequest:
    """A request to a plugin endpoint: `info` (as an authorizer sees it), the path pattern's
    captures (`params`), the query string's values, and the whole body."""

    info: RequestInfo
    params: Mapping[str, str]
    query: Mapping[str, list[str]]
    body: bytes


@dataclass
class Reply:
    """An endpoint's answer. A `dict` or `list` body is sent as JSON, `str` as UTF-8 text."""

    body: bytes | str | dict[str, Any] | list[Any] = b""
    status: int = 200
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Plugin:
    """What every plugin has: a `name` (unique among the loaded plugins) and `setup`, called
    once at start-up with the daemon's view of itself (`ServerView`) before any request."""

    #: the kind, set by each interface ("endpoint", "authorizer", "batching")
    kind: ClassVar[str] = ""
    name: str = ""

    def setup(self, server: ServerView) -> None:
        """Prepare (read files, bind metrics); raise to stop the start with a message."""


class Endpoint(Plugin):
    """A route on the inference or management API: `path` is a pattern whose `{name}` parts
    capture one path segment each ("/models/{name}/stats"); `methods` the HTTP methods it
    answers. It may not shadow a built-in route (start-up error). Requests to it pass through
    the authorizers, the API's limits, access log and metrics like built-in routes."""

    kind: ClassVar[str] = "endpoint"
    api: str = "management"
    path: str = ""
    methods: tuple[str, ...] = ("GET",)

    @abc.abstractmethod
    def handle(self, request: EndpointRequest) -> Reply | Awaitable[Reply]:
        """Answer the request (a coroutine function runs on the loop, a plain one in a
        thread)."""


class Authorizer(Plugin):
    """Allows or denies a request before it is routed. All authorizers must allow (the
    built-in token authorizer first, then plugins in the order they were loaded). Health
    checks (`/ping`, `/v2/health/...`, gRPC `Ping`) are never asked."""

    kind: ClassVar[str] = "authorizer"

    @abc.abstractmethod
    def authorize(self, request: RequestInfo) -> Denied | None:
        """None to allow, a `Denied` to refuse. Quick and non-blocking (see the module)."""


class BatchingStrategy(Plugin):
    """Decides, for one model version's queue, which waiting jobs form a worker's next batch
    and when to send it. A model picks one by name in its model-config.yaml
    (`batchingStrategy: NAME`, with the strategy's own options under `batchingOptions`); one
    instance is made per model version with `configure`, and shared by that version's
    workers: each worker's serving loop calls `next_batch` when the worker is idle, so
    several calls may wait at once on the same queue (one per idle worker).

    The jobs it returns must be ones it took from `queue` (`take`, `take_job`), at least one
    and at most `batch_size`. Jobs it took and did not return go back to the front of the
    queue. If it raises, the jobs it took are answered 500 (the strategy and its traceback in
    ts_log.log) and the worker's loop asks again after a short pause. tsctl's own batching is
    the built-in strategy "default" (`tsctl.server.batching.DefaultBatching`)."""

    kind: ClassVar[str] = "batching"

    def configure(self, options: Mapping[str, Any]) -> BatchingStrategy:
        """The instance for one model version, given its `batchingOptions` (empty when it has
        none). The default returns this one; raise `ValueError` naming the bad option to
        refuse the model (its registration fails with 400 and that message)."""
        return self

    @abc.abstractmethod
    async def next_batch(
        self, queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable
    ) -> list[Job]:
        """The jobs `worker` runs next (at least one, at most `batch_size`), taken from
        `queue` (`take`, `take_job`, `waiting`, `wait_for_job`, `wait_for_more`,
        `likely_arrivals`, `clock`). `max_delay_ms` is the model's `maxBatchDelay`. Cancelled
        when the worker goes away: jobs taken and not returned are given back (it may do so
        itself with `queue.requeue_front`)."""

    def ready_batch(self, queue: ModelQueue, batch_size: int, worker: Hashable) -> list[Job]:
        """A batch to send at once as `worker`'s result arrives, before that result's answers
        are written (so the worker computes while the daemon answers), taken from `queue`
        without waiting; or [] to let `next_batch` collect the next one. Plain, never waits.
        This one sends nothing early; the default strategy sends a full batch."""
        return []


class ServerView(abc.ABC):
    """What a plugin may read of the daemon (given to `setup`)."""

    @abc.abstractmethod
    def setting(self, name: str, default: Any = None) -> Any:
        """A server setting by its config.properties name (e.g. "model_store")."""

    @abc.abstractmethod
    def models(self) -> list[tuple[str, str]]:
        """The registered (model name, version) pairs."""

    @abc.abstractmethod
    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """The current samples of one of the daemon's metrics (by its metrics-API name, e.g.
        "ts_inference_requests_total"): (labels, value) pairs; for a histogram its
        `_bucket`/`_count`/`_sum` series by those names."""
