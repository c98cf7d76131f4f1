"""The REST inference API (TorchServe's paths): ping, predictions, explanations, and the API
description.

Runs on the daemon's event loop, served by tsctl's own HTTP/1.1 layer (`tsctl.server.api.http1`)
rather than tornado: this is the hot path. `route` picks an exchange from the request head.
A `PredictionExchange` checks the model and the declared body size before the body is read
(an oversized body gets its 413 from the Content-Length), joins the body once, parses it into
parts, sends them down the shared request path in `tsctl.server.inference`, and writes the
answer in one piece (or streams it, for handlers that send intermediate answers).
`/explanations/...` takes the same path, with the request header `explain: True` added as
TorchServe's frontend does (its BaseHandler then calls `explain_handle`). The few other paths
answer from a `FixedExchange` (both in `rest_exchange`); KServe v1 and Open Inference Protocol
paths (`/v1/...`, `/v2...`) go to `rest_kserve`. What follows `/predictions/{model}/{version}/`
reaches the handler as the request header `url_path` (empty when nothing follows), as in
TorchServe, whose third segment is always the version. Paths no route above takes are tried
last against SageMaker's and TorchServe's legacy paths (`rest_invocations`), so they cost the
hot path nothing. Plugin endpoints of this API are tried first
(`tsctl.server.endpoint_routes` says in what order, and why none can shadow a built-in route)
and answered by `plugin_routes.EndpointExchange`; without them routing costs nothing more.
"""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any
from urllib.parse import unquote

from tsctl.errors import NOT_ALLOWED_MESSAGE, MethodNotAllowed, NotFound
from tsctl.server.api import http1, rest_invocations, rest_kserve, rest_workflows
from tsctl.server.api.openapi import inference_document
from tsctl.server.api.plugin_routes import EndpointExchange
from tsctl.server.api.rest import NOT_FOUND_MESSAGE, error_response
from tsctl.server.api.rest_exchange import (
    DISCARD_LIMIT,
    EXPLAIN_HEADER,
    FixedExchange,
    PredictionExchange,
)
from tsctl.server.state import ServerState

__all__ = ["EXPLAIN_HEADER", "InferenceApi", "PredictionExchange", "serve"]

#: `/predictions/{model}[/{version}[/{url_path}]]` (and `/explanations/...`); trailing `/`s
#: are dropped, as TorchServe's split of the path drops them. The url path is greedy and ends
#: on a character other than `/`: a lazy `(.*?)/*$` backtracks quadratically on a run of
#: `/`s (a 64 KiB request head of them held the loop for seconds, before any authorization)
_PREDICTIONS = re.compile(r"^/(predictions|explanations)/([^/]+)(?:/([^/]+)(?:/(.*[^/]))?)?/*$")


class InferenceApi:
    """Routes the inference port's requests: `route` is `http1.Server`'s callback."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.routes = state.plugins.routes
        #: the plugin endpoints' routes of this API (None: there are none)
        self.plugins = self.routes.api("inference") if self.routes is not None else None

    def route(self, conn: http1.Connection, head: http1.RequestHead) -> http1.Exchange:
        state = self.state
        method, path = head.method, head.path
        if self.plugins is not None:
            found = self.plugins.match(method, path)
            if found is not None:
                if found.endpoint is not None and self.routes is not None:
                    endpoint, params = found.endpoint, found.params
                    return EndpointExchange(state, conn, head, self.routes, endpoint, params)
                if not found.builtin:  # a plugin's path, a method it does not list
                    return FixedExchange(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
        if path.startswith(("/v1/", "/v2")):  # KServe v1, the Open Inference Protocol
            exchange = rest_kserve.route(state, conn, head)
            if exchange is not None:
                return exchange
        match = _PREDICTIONS.match(path)
        if match is not None and method not in ("OPTIONS", "HEAD"):
            api, model, version, url_path = match.groups()
            if url_path and "%" in url_path:
                url_path = unquote(url_path)
            explain = api == "explanations"
            return PredictionExchange(state, conn, head, model, version, explain, url_path or "")
        answer: Any
        if path == "/ping" and method == "GET":
            answer = {"status": "Healthy"}
        elif (path == "/api-description" and method == "GET") or (
            path == "/" and method in ("GET", "OPTIONS")
        ):
            answer = inference_document()
        elif match is not None or path in ("/ping", "/api-description", "/"):
            answer = MethodNotAllowed(NOT_ALLOWED_MESSAGE)
        else:
            flow = rest_workflows.route(state, conn, head)  # /wfpredict/{workflow}
            if flow is not None:
                return flow
            other = rest_invocations.route(state, conn, head)
            if other is not None:
                return other
            answer = NotFound(NOT_FOUND_MESSAGE)
        return FixedExchange(state, conn, head, answer)


async def serve(
    state: ServerState, sockets: list[socket.socket], tls: ssl.SSLContext | None = None
) -> http1.Server:
    """The inference API on `sockets` (already bound and listening), with TLS if `tls`."""
    config = state.config
    limits = http1.Limits(
        keep_alive_timeout=config.keep_alive_timeout,
        header_timeout=config.request_header_timeout,
        body_timeout=config.request_body_timeout,
        max_connections=config.max_connections,
        discard_limit=DISCARD_LIMIT,
    )
    server = http1.Server(InferenceApi(state).route, error_response, limits, "inference API")
    await server.add_sockets(sockets, tls)
    return server
