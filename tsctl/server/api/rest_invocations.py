"""SageMaker's inference paths and TorchServe's legacy one, on the inference port, routed as
TorchServe 0.12's frontend routes them (its `InferenceRequestHandler`):

- `/invocations` (SageMaker): the model is the query parameter `model_name`; without one, the
  only start-up model (`--models`, a snapshot: `ModelVersion.loaded_at_startup`) when there is
  exactly one; else a `model_name` form field of the body; else 400 `Parameter model_name is
  required.` While the start-up models are still loading, a request that names none is 503
  (`StartingUp`) rather than 400. No header picks the model (TorchServe reads none: not
  `X-Amzn-SageMaker-Target-Model` either); every header, `X-Amzn-SageMaker-*` included,
  reaches the handler as on `/predictions`.
- `/models/{model}/invoke` (SageMaker's multi-model path): that model's default version.
- `/{model}/predict` and `/{model}/{version}/predict` (TorchServe's legacy path).

On these paths, unlike `/predictions`, the query parameters are handler inputs, before the
body's parts, as TorchServe passes them (`GET /noop/predict?data=test` gives the handler
`data`), and no `url_path` header is added. Everything else is `/predictions`' request path
(`rest_exchange.PredictionExchange`): authorization, limits, queue, metrics, access log, errors.
OPTIONS and HEAD are 405, as on `/predictions`.

Runs on the daemon's event loop, and only for paths no other route of `rest_inference` took.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from tsctl.errors import (
    NOT_ALLOWED_MESSAGE,
    BadRequest,
    MethodNotAllowed,
    StartingUp,
    TsctlError,
)
from tsctl.ipc.messages import Part
from tsctl.server.api import http1
from tsctl.server.api.rest_exchange import FixedExchange, PredictionExchange, request_info
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState

_INVOKE = re.compile(r"^/models/([^/]+)/invoke/*$")
_LEGACY = re.compile(r"^/([^/]+)(?:/([^/]+))?/predict/*$")
#: first segments TorchServe routes elsewhere: never a legacy path's model name
_RESERVED = frozenset({"ping", "predictions", "explanations", "invocations", "models"})


def route(
    state: ServerState, conn: http1.Connection, head: http1.RequestHead
) -> http1.Exchange | None:
    """The exchange of one of these paths, or None when the path is none of them."""
    path = head.path
    model: str | None = None
    version: str | None = None
    if path.rstrip("/") == "/invocations":
        pass
    elif (invoke := _INVOKE.match(path)) is not None:
        model = invoke[1]
    elif (legacy := _LEGACY.match(path)) is not None and legacy[1] not in _RESERVED:
        model, version = legacy[1], legacy[2]
    else:
        return None
    if head.method in ("OPTIONS", "HEAD"):
        return FixedExchange(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
    if model is None:
        return InvocationExchange(state, conn, head)
    return QueryExchange(state, conn, head, model, version, False)


def query_parts(target: str) -> list[Part]:
    """The query parameters of a request target as handler inputs (values percent-decoded,
    `+` as a space, a name without `=` an empty value), in their order."""
    query = target.partition("?")[2]
    if not query:
        return []
    return [Part(name, "", value.encode()) for name, value in parse_qsl(query, True)]


class QueryExchange(PredictionExchange):
    """A prediction whose query parameters are handler inputs, before the body's parts."""

    def _parts(self, body: bytes) -> list[Part]:
        return [*query_parts(self.head.target), *super()._parts(body)]


class InvocationExchange(QueryExchange):
    """`/invocations`: the model named by the query, else the only start-up model, checked
    from the head; else named by a form field, checked once the body is in."""

    def __init__(self, state: ServerState, conn: http1.Connection, head: http1.RequestHead):
        super().__init__(state, conn, head, "", None, False)
        #: the body's parts, when they were parsed to find the model
        self.parsed: list[Part] | None = None

    def headers_received(self) -> None:
        state = self.state
        named = [p.data for p in query_parts(self.head.target) if p.name == "model_name"]
        name = bytes(named[0]).decode() if named and named[0] else _only_startup_model(state)
        if name:
            self.model = name
            super().headers_received()
            return
        try:
            self.admit(None)
            if state.loading_startup_models:
                raise StartingUp("Parameter model_name is required while the models load")
        except TsctlError as exc:
            self.refuse_early(exc)

    def finish(self) -> None:
        if self.mv is None and self.error is None:
            try:
                self.mv = self._named_by_form()
            except TsctlError as exc:
                self.error = exc  # answered by `take_body`
        super().finish()

    def _named_by_form(self) -> ModelVersion:
        """The model a `model_name` part of the body names (the body parsed once)."""
        body = b"".join(self.chunks)
        self.chunks = [body]
        self.parsed = self._parts(body)
        named = [p.data for p in self.parsed if p.name == "model_name" and p.data]
        if not named:
            raise BadRequest("Parameter model_name is required.")
        self.model = bytes(named[0]).decode("utf-8", "replace")
        state = self.state
        if state.authorizers:
            state.authorize(request_info(self.conn, self.head, self.model))
        return state.model_for_inference(self.model, None)

    def _parts(self, body: bytes) -> list[Part]:
        return self.parsed if self.parsed is not None else super()._parts(body)


def _only_startup_model(state: ServerState) -> str | None:
    """The name of the one model loaded at start-up, if exactly one was (TorchServe's rule)."""
    names = [
        name
        for name, versions in state.registry.models.items()
        if any(mv.loaded_at_startup for mv in versions.values())
    ]
    return names[0] if len(names) == 1 else None
