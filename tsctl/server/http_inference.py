"""The REST inference API (TorchServe's paths): ping, predictions, explanations, and the API
description.

Runs on the daemon's event loop. `/predictions/...` (POST and PUT, and like TorchServe any
other method but OPTIONS and HEAD), the hot path, skips tornado's
`RequestHandler` machinery: `InferenceRouter` hands those requests to a `PredictionDelegate`
that receives the body chunks itself (so an oversized body gets its 413 from the
Content-Length, before it is read), joins them once, parses them into parts, sends them down
the shared request path in `tsctl.server.inference`, and writes the answer straight to the
connection. `/explanations/...` takes the same path, with the request header `explain: True`
added as TorchServe's frontend does (its BaseHandler then calls `explain_handle`). Every other
path goes through an ordinary tornado `Application`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPFile, HTTPInputError, parse_body_arguments

from tsctl.errors import BadRequest, RequestTooLarge, ServiceUnavailable, TsctlError
from tsctl.protocol import Part
from tsctl.server.batching import ClientGone
from tsctl.server.http_common import (
    ApiHandler,
    NotFoundHandler,
    access_line,
    base_headers,
    error_response,
    log,
    log_request,
    new_request_id,
)
from tsctl.server.inference import InferenceRequest, Pending
from tsctl.server.openapi import inference_api_description
from tsctl.server.prometheus import HOSTNAME
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState
from tsctl.server.workers import Response

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: how far past max_request_size a body is still read (and discarded) to answer 413 cleanly
DISCARD_LIMIT = 64 << 20
_PREDICTIONS = re.compile(r"^/predictions/([^/]+)(?:/([^/]+))?/?$")
_EXPLANATIONS = re.compile(r"^/explanations/([^/]+)(?:/([^/]+))?/?$")
#: the header TorchServe's frontend adds to an explanation request for the handler to see
EXPLAIN_HEADER = ("explain", "True")


class PingHandler(ApiHandler):
    def get(self) -> None:
        self.write_json({"status": "Healthy"})


class DescriptionHandler(ApiHandler):
    def get(self) -> None:
        self.write_json(inference_api_description())

    def options(self) -> None:
        self.get()


class PredictionsOtherMethods(ApiHandler):
    """`/predictions/...` with OPTIONS or HEAD: 405 (TorchServe predicts on any other method)."""


class PredictionDelegate(httputil.HTTPMessageDelegate):
    """One prediction request, from its headers to the answer written on the connection."""

    def __init__(
        self,
        state: ServerState,
        connection: httputil.HTTPConnection,
        start_line: httputil.RequestStartLine,
        headers: httputil.HTTPHeaders,
        args: Any,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.state = state
        self.connection = connection
        self.start_line = start_line
        self.headers = headers
        self.extra_headers = extra_headers
        self.model, self.version = args
        self.request_id = new_request_id(headers.get("x-request-id"))
        self.started = time.perf_counter()
        self.arrival = time.monotonic()  # the event loop's clock
        self.chunks: list[bytes] = []
        self.size = 0
        self.error: TsctlError | None = None
        self.mv: ModelVersion | None = None
        self.pending: Pending | None = None
        self.answered = False
        self.streaming = False
        state.request_started()
        if isinstance(self.connection, HTTP1Connection):
            # called if the client disconnects, also while the answer is being computed
            self.connection.set_close_callback(self.on_connection_close)

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        state = self.state
        try:
            state.authorize("inference", headers.get("Authorization"))
            if state.draining:
                raise ServiceUnavailable("the server is shutting down")
            self.mv = state.registry.get(self.model, self.version)
        except TsctlError as exc:
            self.error = exc
        limit = state.config.max_request_size
        declared = headers.get("Content-Length", "")
        size = int(declared) if declared.isdigit() else 0
        if size > limit + DISCARD_LIMIT:
            # too big to read and throw away: answer now; tornado then closes the connection
            self._answer_error(
                RequestTooLarge(f"request body of {size} bytes exceeds max_request_size ({limit})")
            )
            return
        if isinstance(self.connection, HTTP1Connection):
            # a body a little too large is read and discarded, so the client sees the 413
            self.connection.set_max_body_size(limit + DISCARD_LIMIT)

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.error is not None or self.answered:
            return
        if self.size > self.state.config.max_request_size:
            limit = self.state.config.max_request_size
            self.error = RequestTooLarge(f"request body exceeds max_request_size ({limit})")
            self.chunks.clear()
            return
        self.chunks.append(chunk)

    def finish(self) -> None:
        if self.answered:
            return
        if self.error is not None:
            self._answer_error(self.error)
            return
        chunks, self.chunks = self.chunks, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            assert self.mv is not None
            request = InferenceRequest(
                self.request_id,
                self._parts(body),
                [*self.headers.get_all(), *self.extra_headers],
                self.arrival,
            )
            stream = getattr(self.connection, "stream", None)
            self.pending = Pending(self.mv, request, stream, self._on_chunk)
        except TsctlError as exc:
            self._answer_error(exc)
            return
        self.pending.when_done(self._respond)

    def _respond(self, outcome: Response | BaseException) -> None:
        if isinstance(outcome, ClientGone):
            self._done(499)  # nginx's "client closed request", for the access log
            return
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, TsctlError):
                log.error("unexpected error answering request %s: %r", self.request_id, outcome)
            self._answer_error(outcome)
            return
        response = outcome
        stats = self.state.stats
        assert self.mv is not None
        labels = (self.mv.name, self.mv.version, HOSTNAME)
        stats.requests_total.inc(labels)
        stats.latency.inc(labels, (time.perf_counter() - self.started) * 1e6)
        headers = {**base_headers(self.request_id), **self.state.cors}
        if response.content_type:
            headers["Content-Type"] = response.content_type
        headers.update(response.headers)
        self._write(
            response.status, response.reason or _reason(response.status), headers, response.body
        )

    def _on_chunk(self, chunk: Response) -> None:
        """An intermediate answer of a streaming handler: sent at once, chunked."""
        if self.answered:
            return
        try:
            if not self.streaming:
                self.streaming = True
                headers = {**base_headers(self.request_id), **self.state.cors}
                if chunk.content_type:
                    headers["Content-Type"] = chunk.content_type
                headers.update(chunk.headers)
                self.connection.write_headers(  # no Content-Length: tornado sends it chunked
                    httputil.ResponseStartLine("HTTP/1.1", chunk.status, _reason(chunk.status)),
                    httputil.HTTPHeaders(headers),
                    bytes(chunk.body),
                )
            else:
                self.connection.write(bytes(chunk.body))
        except Exception:  # the client went away mid-stream
            log.debug("could not stream to %s", self.request_id)

    def _answer_error(self, exc: BaseException) -> None:
        status, body, extra = error_response(exc)
        headers = {
            **base_headers(self.request_id),
            **self.state.cors,
            "Content-Type": "application/json",
            **extra,
        }
        self._write(status, _reason(status), headers, body)

    def _write(
        self, status: int, reason: str, headers: dict[str, str], body: bytes | bytearray
    ) -> None:
        if self.answered:
            return
        self.answered = True
        if self.streaming:  # the last piece of a streamed answer (or its error, as text)
            try:
                self.connection.write(bytes(body))
                self.connection.finish()
            except Exception:
                log.debug("could not finish the stream to %s", self.request_id)
            self._done(status)
            return
        headers["Content-Length"] = str(len(body))
        try:
            self.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", status, reason),
                httputil.HTTPHeaders(headers),
                bytes(body) if isinstance(body, bytearray) else body,
            )
            self.connection.finish()
        except Exception:  # the client went away while we wrote: nothing more to do
            log.debug("could not write the answer to %s", self.request_id)
        self._done(status)

    def _done(self, status: int) -> None:
        self.answered = True
        elapsed = (time.perf_counter() - self.started) * 1000
        line = self.start_line
        self.state.access_log.write(
            access_line(self.connection, line.method, line.path, line.version, status, elapsed)
        )
        self.state.answered(status)
        self.state.request_finished()

    def on_connection_close(self) -> None:
        if self.pending is not None:
            self.pending.abandon()
        elif not self.answered:
            self._done(499)

    def _parts(self, body: bytes) -> list[Part]:
        headers = self.headers
        content_type = headers.get("Content-Type", "")
        parts: list[Part] = []  # like TorchServe: query parameters are not handler inputs
        if content_type.split(";", 1)[0].strip().lower() not in _FORM_TYPES:
            parts.append(Part("body", content_type, body))
            return parts
        arguments: dict[str, list[bytes]] = {}
        files: dict[str, list[HTTPFile]] = {}
        try:
            parse_body_arguments(content_type, body, arguments, files, headers)
        except HTTPInputError as exc:
            raise BadRequest(f"malformed {content_type.split(';')[0]} body: {exc}") from None
        if not arguments and not files and body:
            raise BadRequest(f"could not parse the {content_type.split(';')[0]} body")
        for name, values in arguments.items():
            parts.extend(Part(name, "", value) for value in values)
        for name, uploads in files.items():
            parts.extend(Part(name, f.content_type or "", f.body) for f in uploads)
        return parts


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class InferenceRouter(httputil.HTTPServerConnectionDelegate):
    """Predictions go to `PredictionDelegate`; everything else to the tornado application."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.app = tornado.web.Application(
            [
                (r"/ping", PingHandler),
                (r"/api-description", DescriptionHandler),
                (r"/", DescriptionHandler),
                (r"/predictions/.*", PredictionsOtherMethods),
                (r"/explanations/.*", PredictionsOtherMethods),
            ],
            default_handler_class=NotFoundHandler,
            log_function=log_request,
            compress_response=False,
            state=state,
        )

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        stream = getattr(request_conn, "stream", None)
        if stream is not None and "set_nodelay" not in vars(stream):
            # Answers are small and must leave at once: keep TCP_NODELAY on for the whole
            # connection instead of tornado's two setsockopt calls per request.
            stream.set_nodelay(True)
            stream.set_nodelay = _keep_nodelay
        return _Dispatch(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


def _keep_nodelay(value: bool) -> None:
    """Stands in for `IOStream.set_nodelay` once the connection has TCP_NODELAY for good."""


class _Dispatch(httputil.HTTPMessageDelegate):
    """Picks the delegate from the request line alone: predictions skip building a
    `HTTPServerRequest`; every other request goes to the application as usual."""

    def __init__(
        self, router: InferenceRouter, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> None:
        self.router = router
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.delegate: httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        match = None
        extra: tuple[tuple[str, str], ...] = ()
        if start_line.method not in ("OPTIONS", "HEAD"):
            path = start_line.path.partition("?")[0]
            match = _PREDICTIONS.match(path)
            if match is None and (match := _EXPLANATIONS.match(path)) is not None:
                extra = (EXPLAIN_HEADER,)
        if match:
            self.delegate = PredictionDelegate(
                self.router.state, self.request_conn, start_line, headers, match.groups(), extra
            )
        else:
            self.delegate = self.router.app.start_request(self.server_conn, self.request_conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.delegate is not None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        assert self.delegate is not None
        self.delegate.finish()

    def on_connection_close(self) -> None:
        # tornado calls this when the client goes away while the request is being read; once
        # it is read, `peer_closed` is asked just before the request would go to a worker
        if self.delegate is not None:
            self.delegate.on_connection_close()


def make_app(state: ServerState) -> InferenceRouter:
    return InferenceRouter(state)
