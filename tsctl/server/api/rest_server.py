"""The tornado HTTP server the management and metrics APIs run on, with the daemon's limits.

tornado's `HTTPServer` with three additions, each for a client that would otherwise hold
resources without bound:

- **Connections**: at most `max_connections` open on one port; a connection accepted beyond
  it is closed at once (the others are unaffected), and the first refusal is logged.
- **Time**: tornado has one timer from the end of an answer (or the connection's start) to the
  end of the next request's head: it is set to the smaller of `keep_alive_timeout` and
  `request_header_timeout`, so that neither bound is exceeded (an idle connection is closed
  after that, a head still incomplete then too). A body must be in within
  `request_body_timeout` from the end of its head; tornado closes the connection otherwise
  (no 408: tornado writes nothing then).
- **Body size**: a body over `max_request_size` gets the REST error funnel's 413 in TorchServe's
  JSON shape instead of tornado's reset connection. Declared by `Content-Length` with
  `Expect: 100-continue`, it is answered at once (no `100 Continue`) and the connection closed;
  otherwise the body is read and dropped (up to `DISCARD_LIMIT` past the limit, as on the
  inference port) so that the client is reading when the answer comes, and the connection
  stays usable.
- **TLS** (`https://` addresses): tornado's `ssl_options` with the daemon's context
  (`tsctl.server.tls`). A failed handshake (a plain-HTTP client, an old TLS version) closes
  the connection and is logged at DEBUG, not as tornado's warning. On a plain port, a client
  that starts a TLS handshake (its first byte is 0x16, a TLS handshake record, which no HTTP
  request starts with) is closed at once instead of waiting for a request head that never
  comes.

Runs on the daemon's event loop; nothing here blocks.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.web import Application

from tsctl.errors import RequestTooLarge
from tsctl.server.api.rest import access_line, base_headers, error_response
from tsctl.server.request import new_request_id
from tsctl.server.state import ServerState

log = logging.getLogger("tsctl.server")

#: how far past max_request_size a body is still read (and dropped) to answer 413 cleanly;
#: beyond it tornado answers 400 and closes
DISCARD_LIMIT = 64 << 20


class LimitedServer(HTTPServer):
    """A tornado `HTTPServer` with a connection limit and a 413 for over-size bodies.

    Made by `serve` (tornado's servers are `Configurable`: `initialize` is their constructor,
    so the limits are set on the instance after it)."""

    state: ServerState
    api = ""
    max_connections = 0
    refused = 0
    port = ""

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self.ssl_options is None:  # nothing was read from it yet: same socket, new stream
            stream = PlainStream(
                stream.socket,
                max_buffer_size=stream.max_buffer_size,
                read_chunk_size=stream.read_chunk_size,
            )
        if len(self._connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1:
                log.warning(
                    "the %s API (port %s) reached max_connections (%d): new connections are "
                    "closed until some close (logged once)",
                    self.api,
                    self.port,
                    self.max_connections,
                )
            stream.close()
            return
        super().handle_stream(stream, address)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        inner = super().start_request(server_conn, request_conn)
        return BoundedBody(inner, request_conn, self.state)


class PlainStream(IOStream):
    """A plain-HTTP connection that ends at once when its first byte starts a TLS handshake
    (a TLS client on a plain port would otherwise wait for its own timeout)."""

    first = True

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        count = super().read_from_fd(buf)
        if self.first and count:
            self.first = False
            if buf[0] == TLS_HANDSHAKE:
                log.debug("closed a connection that began a TLS handshake on a plain port")
                return 0  # read as the end of the stream: tornado closes it quietly
        return count


#: the first byte of a TLS handshake record
TLS_HANDSHAKE = 0x16


class QuietHandshakeErrors(logging.Filter):
    """Turns tornado's "SSL Error on ..." warning (a failed TLS handshake: a plain-HTTP client,
    a client that offers only old TLS versions) into a DEBUG line of tsctl's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("SSL Error on"):
            log.debug("TLS handshake failed: %s", record.getMessage())
            return False
        return True


_QUIET = QuietHandshakeErrors()


def _declared_length(headers: httputil.HTTPHeaders) -> int | None:
    """A plain `Content-Length`'s value (tornado checks its syntax later), or None."""
    value = headers.get("Content-Length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


class BoundedBody(httputil.HTTPMessageDelegate):
    """Passes a request to the application, unless its body is over `max_request_size`: then
    the body is dropped and the answer is the 413 (the application never sees the request)."""

    def __init__(
        self,
        inner: httputil.HTTPMessageDelegate,
        conn: httputil.HTTPConnection,
        state: ServerState,
    ) -> None:
        self.inner = inner
        self.conn = conn
        self.state = state
        self.limit = state.config.max_request_size
        self.received = 0
        self.declared: int | None = None
        self.refused = False
        self.passed = False  # the application has seen the head
        self.start_line: httputil.RequestStartLine | None = None
        self.request_id = ""
        self.started = time.perf_counter()
        self.client = ""

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        self.start_line = start_line
        self.request_id = new_request_id(headers.get("x-request-id"))
        declared = self.declared = _declared_length(headers)
        if declared is not None and declared > self.limit:
            self.refused = True
            if headers.get("Expect", "").lower() == "100-continue":
                self._answer(close=True)  # the client waits: no body will come
            return None
        self.passed = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.limit:  # a chunked body: its size is known only now
            self.refused = True
            self.inner.on_connection_close()  # the application forgets the request
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if self.refused:
            self._answer(close=False)
            return
        self.inner.finish()

    def on_connection_close(self) -> None:
        if self.passed and not self.refused:
            self.inner.on_connection_close()

    def _answer(self, close: bool) -> None:
        size = self.declared
        shown = f"request body of {size} bytes" if size is not None else "request body"
        error = RequestTooLarge(f"{shown} exceeds max_request_size ({self.limit})")
        status, body, extra = error_response(error, self.request_id)
        headers = httputil.HTTPHeaders(
            {**base_headers(self.request_id), **self.state.cors, **extra}
        )
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
        if close:
            headers["Connection"] = "close"
        self.conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", status, "Payload Too Large"), headers, body
        )
        self.conn.finish()
        self._log(status)

    def _log(self, status: int) -> None:
        line = self.start_line
        assert line is not None
        context = getattr(self.conn, "context", None)
        peer = getattr(context, "address", None)
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        ms = (time.perf_counter() - self.started) * 1000
        self.state.access_log.write(
            access_line(client, line.method, line.path, line.version, status, ms)
        )
        self.state.answered(status)


def serve(
    app: Application,
    state: ServerState,
    api: str,
    sockets: list[socket.socket],
    tls: ssl.SSLContext | None = None,
) -> LimitedServer:
    """Serve `app` (the `api` named in log lines) on `sockets` (bound and listening), with
    TLS when `tls` is given."""
    config = state.config
    if tls is not None:
        logging.getLogger("tornado.general").addFilter(_QUIET)  # once: filters are a set
    server = LimitedServer(
        app,
        max_body_size=config.max_request_size + DISCARD_LIMIT,
        idle_connection_timeout=min(config.keep_alive_timeout, config.request_header_timeout),
        body_timeout=config.request_body_timeout,
        ssl_options=tls,
    )
    server.state = state
    server.api = api
    server.max_connections = config.max_connections
    server.port = ", ".join(str(s.getsockname()[1]) for s in sockets)
    server.add_sockets(sockets)
    return server
