"""The inference port's exchanges (one request each, on tsctl's HTTP/1.1 layer), shared by
every REST protocol: TorchServe's (`rest_inference`), KServe v1 and the Open Inference Protocol
(`rest_kserve`).

Runs on the daemon's event loop; nothing here blocks. A `PredictionExchange` checks the model
and the declared body size before the body is read (an oversized body gets its 413 from the
Content-Length), joins the body once, turns it into parts (`_parts`: raw, or multipart/form
fields; a protocol adapter overrides it), sends them down the shared request path in
`tsctl.server.inference`, and writes the answer in one piece (or streams it, for handlers that
send intermediate answers). Errors are answered through `answer_error`, TorchServe's shape
here; a protocol adapter overrides it with its own. A `FixedExchange` answers a document (or an
error) that does not depend on the body.
"""

from __future__ import annotations

import functools
import json
import time
from types import MappingProxyType
from typing import Any

from tornado.httputil import HTTPFile, HTTPInputError, parse_body_arguments

from tsctl.errors import BadRequest, RequestTooLarge, ServiceUnavailable, TsctlError
from tsctl.ipc.messages import Part
from tsctl.plugins.api import RequestInfo
from tsctl.server.api import http1
from tsctl.server.api.rest import access_line, base_headers, error_response, log
from tsctl.server.inference import submit
from tsctl.server.registry import ModelVersion
from tsctl.server.request import ClientGone, InferenceRequest, Job, Response, new_request_id
from tsctl.server.state import ServerState

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: how much of a refused request's body is still read (and dropped) so the answer arrives
DISCARD_LIMIT = 64 << 20
#: the header TorchServe's frontend adds to an explanation request for the handler to see
EXPLAIN_HEADER = ("explain", "True")
#: what `/predictions` and `/explanations` add without an extra path (`url_path` empty)
_NO_URL_PATH = (("url_path", ""),)
_NO_URL_PATH_EXPLAIN = (("url_path", ""), EXPLAIN_HEADER)


@functools.lru_cache(maxsize=64)
def _content_type_line(content_type: str) -> bytes:
    """The `Content-Type` line of an answer (none for ""), checked and made once per type."""
    return http1.header_lines((("Content-Type", content_type),)) if content_type else b""


@functools.lru_cache(maxsize=16)
def _fixed_lines(cors: tuple[tuple[str, str], ...]) -> bytes:
    """The header lines every answer carries besides its id (`base_headers`, CORS)."""
    fixed = {**base_headers(""), **dict(cors)}
    del fixed["x-request-id"]
    return http1.header_lines(fixed.items())


def request_info(conn: http1.Connection, head: http1.RequestHead, model: str | None) -> RequestInfo:
    """What the authorizers know of a request on the inference port (built only when there
    are authorizers: `ServerState.authorizers`)."""
    peer = "" if conn.client == "unknown" else conn.client
    headers = MappingProxyType(head.fields)
    return RequestInfo("inference", head.method, head.path, headers, peer, model, "http")


class _Exchange(http1.Exchange):
    """What every inference exchange shares: the request id, the answer, the access log."""

    def __init__(self, state: ServerState, conn: http1.Connection, head: http1.RequestHead):
        super().__init__(conn, head)
        self.state = state
        self.request_id = new_request_id(head.fields.get("x-request-id") or None)
        self.started = time.perf_counter()
        self.answered = False
        state.request_started()

    def answer(
        self,
        status: int,
        body: bytes | bytearray,
        content_type: str = "application/json",
        extra: dict[str, str] | tuple[tuple[str, str], ...] = (),
        reason: str | None = None,
    ) -> None:
        if self.answered:
            return
        if extra:  # headers of the handler's may replace the fixed ones: merged by name
            headers = {**base_headers(self.request_id), **self.state.cors}
            if content_type:
                headers["Content-Type"] = content_type
            headers.update(extra)
            self.conn.respond(status, headers, body, reason)
        else:  # the common case: the fixed headers as bytes made once, the id a token
            lead = b"x-request-id: %b\r\n%b%b" % (
                self.request_id.encode("latin-1"),
                _fixed_lines(tuple(self.state.cors.items())),
                _content_type_line(content_type),
            )
            self.conn.respond(status, {}, body, reason, lead)
        self.done(status)

    def answer_error(self, exc: BaseException) -> None:
        status, body, extra = error_response(exc)
        self.answer(status, body, extra=extra)

    def refuse(self, exc: BaseException) -> None:
        self.answer_error(exc)

    def too_large(self, size: int | None) -> None:
        limit = self.state.config.max_request_size
        shown = f"request body of {size} bytes" if size is not None else "request body"
        self.answer_error(RequestTooLarge(f"{shown} exceeds max_request_size ({limit})"))

    def done(self, status: int) -> None:
        if self.answered:
            return
        self.answered = True
        elapsed = (time.perf_counter() - self.started) * 1000
        head = self.head
        self.state.access_log.write(
            access_line(self.conn.client, head.method, head.target, head.version, status, elapsed)
        )
        self.state.answered(status)
        self.state.request_finished()

    def connection_lost(self) -> None:
        self.done(499)  # nginx's "client closed request", for the access log


class FixedExchange(_Exchange):
    """A request whose answer does not depend on its body: a JSON document (or its bytes), or
    an error, sent once the body is in."""

    def __init__(
        self, state: ServerState, conn: http1.Connection, head: http1.RequestHead, answer: Any
    ) -> None:
        super().__init__(state, conn, head)
        self.fixed = answer

    def body_limit(self) -> int | None:
        return self.state.config.max_request_size

    def headers_received(self) -> None:
        if isinstance(self.fixed, TsctlError):  # refused before the body is read
            self.answer_error(self.fixed)

    def finish(self) -> None:
        if isinstance(self.fixed, TsctlError):
            self.answer_error(self.fixed)
        elif isinstance(self.fixed, bytes):  # JSON already
            self.answer(200, self.fixed)
        else:
            self.answer(200, json.dumps(self.fixed, indent=2).encode())


class BodyExchange(_Exchange):
    """An exchange that reads its whole body (at most `max_request_size`), or is refused from
    its head (`refuse_early`) and then answered once the body has been read past."""

    def __init__(self, state: ServerState, conn: http1.Connection, head: http1.RequestHead):
        super().__init__(state, conn, head)
        self.chunks: list[bytes] = []
        self.error: TsctlError | None = None

    def body_limit(self) -> int | None:
        return self.state.config.max_request_size

    def admit(self, model: str | None) -> None:
        """The checks every request with a body passes from its head: authorized (`model` is
        what the authorizers see), and the server not shutting down; else the refusal."""
        state = self.state
        if state.authorizers:
            state.authorize(request_info(self.conn, self.head, model))
        if state.draining:
            raise ServiceUnavailable("the server is shutting down")

    def refuse_early(self, exc: TsctlError) -> None:
        self.error = exc
        self.answer_error(exc)

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def take_body(self) -> bytes | None:
        """The body, joined once; None when the request was refused (now answered)."""
        if self.error is not None:
            self.answer_error(self.error)
            return None
        chunks, self.chunks = self.chunks, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class PredictionExchange(BodyExchange):
    """One prediction request, from its head to the answer written on the connection."""

    #: whether a streaming handler's intermediate answers are sent (TorchServe's REST only)
    streams = True

    def __init__(
        self,
        state: ServerState,
        conn: http1.Connection,
        head: http1.RequestHead,
        model: str,
        version: str | None,
        explain: bool,
        url_path: str | None = None,
    ) -> None:
        super().__init__(state, conn, head)
        self.model = model
        self.version = version
        self.explain = explain
        #: the headers this path adds after the client's (so they win): TorchServe's
        #: `url_path` (paths of `/predictions` and `/explanations` only) and `explain`
        self.added: tuple[tuple[str, str], ...]
        if url_path is None:
            self.added = (EXPLAIN_HEADER,) if explain else ()
        elif not url_path:
            self.added = _NO_URL_PATH_EXPLAIN if explain else _NO_URL_PATH
        else:
            path = ("url_path", url_path)
            self.added = (path, EXPLAIN_HEADER) if explain else (path,)
        self.arrival = time.monotonic()  # the event loop's clock
        self.mv: ModelVersion | None = None
        self.job: Job | None = None
        self.streaming = False

    def headers_received(self) -> None:
        """Refused before the body is read (and without `100 Continue`) when the request
        cannot succeed: not authorized, shutting down, no such model."""
        try:
            self.admit(self.model)
            self.mv = self.state.model_for_inference(self.model, self.version)
        except TsctlError as exc:
            self.refuse_early(exc)

    def finish(self) -> None:
        body = self.take_body()
        if body is None:
            return
        headers = self.head.headers
        try:
            assert self.mv is not None
            request = InferenceRequest(
                self.request_id,
                self._parts(body),
                [*headers, *self.added] if self.added else headers,
                self.arrival,
            )
            on_chunk = self._on_chunk if self.streams else None
            self.job = submit(self.mv, request, self.conn, self._respond, on_chunk)
        except TsctlError as exc:
            self.answer_error(exc)

    def _respond(self, outcome: Response | BaseException) -> None:
        if isinstance(outcome, ClientGone):
            self.done(499)
            return
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, TsctlError):
                log.error(
                    "unexpected error answering request %s",
                    self.request_id,
                    exc_info=(type(outcome), outcome, outcome.__traceback__),
                )
            if self.streaming:  # the error's JSON ends the stream
                status, body, _ = error_response(outcome)
                self._end_stream(status, body)
                return
            self.answer_error(outcome)
            return
        response = outcome
        mv = self.mv
        assert mv is not None
        self.state.metrics.for_model(mv.name, mv.version).answered(
            time.perf_counter() - self.started
        )
        if self.streaming:
            self._end_stream(response.status, bytes(response.body))
            return
        self.answer(
            response.status,
            response.body,
            response.content_type,
            response.headers,
            response.reason,
        )

    def _on_chunk(self, chunk: Response) -> None:
        """An intermediate answer of a streaming handler: sent at once, chunked."""
        if self.answered:
            return
        if not self.streaming:
            headers = {**base_headers(self.request_id), **self.state.cors}
            if chunk.content_type:
                headers["Content-Type"] = chunk.content_type
            headers.update(chunk.headers)
            self.streaming = self.conn.start_stream(
                chunk.status, headers, bytes(chunk.body), chunk.reason
            )
        else:
            self.conn.stream(bytes(chunk.body))

    def _end_stream(self, status: int, last: bytes) -> None:
        self.conn.end_stream(last)
        self.done(status)

    def connection_lost(self) -> None:
        if self.job is not None:
            self.job.answer(ClientGone())  # `_respond` logs the 499
        else:
            self.done(499)

    def _parts(self, body: bytes) -> list[Part]:
        content_type = self.head.fields.get("content-type", "")
        parts: list[Part] = []  # like TorchServe: query parameters are not handler inputs
        if content_type.split(";", 1)[0].strip().lower() not in _FORM_TYPES:
            parts.append(Part("body", content_type, body))
            return parts
        arguments: dict[str, list[bytes]] = {}
        files: dict[str, list[HTTPFile]] = {}
        try:
            parse_body_arguments(content_type, body, arguments, files)
        except HTTPInputError as exc:
            raise BadRequest(f"malformed {content_type.split(';')[0]} body: {exc}") from None
        if not arguments and not files and body:
            raise BadRequest(f"could not parse the {content_type.split(';')[0]} body")
        for name, values in arguments.items():
            parts.extend(Part(name, "", value) for value in values)
        for name, uploads in files.items():
            parts.extend(Part(name, f.content_type or "", f.body) for f in uploads)
        return parts
