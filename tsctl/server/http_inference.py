"""The REST inference API (TorchServe's paths): ping, predictions, and the API description.

Runs on the daemon's event loop. Prediction bodies are streamed in (so an oversized body gets
a 413 from its Content-Length before it is read), joined once, parsed into parts, and sent
down the shared request path in `tsctl.server.inference`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPFile, HTTPInputError, parse_body_arguments

from tsctl.errors import BadRequest, RequestTooLarge, ServiceUnavailable
from tsctl.protocol import Part
from tsctl.server.http_common import ApiHandler, NotFoundHandler, log_request
from tsctl.server.inference import ClientGone, InferenceRequest, Pending
from tsctl.server.openapi import inference_api_description
from tsctl.server.state import ServerState

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: how far past max_request_size a body is still read (and discarded) to answer 413 cleanly
DISCARD_LIMIT = 64 << 20


class PingHandler(ApiHandler):
    def get(self) -> None:
        self.write_json({"status": "Healthy"})


class DescriptionHandler(ApiHandler):
    def get(self) -> None:
        self.write_json(inference_api_description())

    def options(self) -> None:
        self.get()


@tornado.web.stream_request_body
class PredictionsHandler(ApiHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._pending: Pending | None = None
        self._counted = False

    def prepare(self) -> None:
        state = self.state
        if self.request.method not in ("POST", "PUT"):
            return  # tornado answers 405 through write_error
        if state.draining:
            raise ServiceUnavailable("the server is shutting down")
        self.arrival = asyncio.get_running_loop().time()
        state.request_started()
        self._counted = True
        self.mv = state.registry.get(*self.path_args)
        limit = state.config.max_request_size
        declared = self.request.headers.get("Content-Length", "")
        size = int(declared) if declared.isdigit() else 0
        if size > limit + DISCARD_LIMIT:
            # too big to read and throw away: answer now and close the connection
            self.set_header("Connection", "close")
            raise RequestTooLarge(
                f"request body of {size} bytes exceeds max_request_size ({limit})"
            )
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # a body a little too large is read and discarded, so the client sees the 413
            connection.set_max_body_size(limit + DISCARD_LIMIT)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.state.config.max_request_size:
            self._too_large = True
            self._chunks.clear()
        elif not self._too_large:
            self._chunks.append(chunk)

    async def post(self, model: str, version: str | None = None) -> None:
        if self._too_large:
            limit = self.state.config.max_request_size
            raise RequestTooLarge(f"request body exceeds max_request_size ({limit})")
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        request = InferenceRequest(
            self.request_id,
            self._parts(body),
            list(self.request.headers.get_all()),
            self.arrival,
        )
        stream = getattr(self.request.connection, "stream", None)
        self._pending = Pending(self.mv, request, stream)
        try:
            response = await self._pending.result()
        except ClientGone:
            self.set_status(499, "Client Closed Request")  # for the access log (nginx's code)
            return
        self.set_status(response.status, response.reason or _reason(response.status))
        if response.content_type:
            self.set_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.set_header(name, value)
        self.finish(bytes(response.body) if isinstance(response.body, bytearray) else response.body)

    put = post

    def _parts(self, body: bytes) -> list[Part]:
        content_type = self.request.headers.get("Content-Type", "")
        parts = [
            Part(name, "", value.encode())
            for name, values in self.request.query_arguments.items()
            for value in (v.decode("utf-8", "replace") for v in values)
        ]
        if content_type.split(";", 1)[0].strip().lower() not in _FORM_TYPES:
            parts.append(Part("body", content_type, body))
            return parts
        arguments: dict[str, list[bytes]] = {}
        files: dict[str, list[HTTPFile]] = {}
        try:
            parse_body_arguments(content_type, body, arguments, files, self.request.headers)
        except HTTPInputError as exc:
            raise BadRequest(f"malformed {content_type.split(';')[0]} body: {exc}") from None
        if not arguments and not files and body:
            raise BadRequest(f"could not parse the {content_type.split(';')[0]} body")
        for name, values in arguments.items():
            parts.extend(Part(name, "", value) for value in values)
        for name, uploads in files.items():
            parts.extend(Part(name, f.content_type or "", f.body) for f in uploads)
        return parts

    def on_connection_close(self) -> None:
        if self._pending is not None:
            self._pending.abandon()

    def on_finish(self) -> None:
        if self._counted:
            self.state.request_finished()
            self._counted = False


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def make_app(state: ServerState) -> tornado.web.Application:
    kwargs: dict[str, Any] = {"state": state}
    return tornado.web.Application(
        [
            (r"/ping", PingHandler),
            (r"/api-description", DescriptionHandler),
            (r"/", DescriptionHandler),
            (r"/predictions/([^/]+)", PredictionsHandler, kwargs),
            (r"/predictions/([^/]+)/([^/]+)", PredictionsHandler, kwargs),
        ],
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        compress_response=False,
    )
