"""One client connection of the HTTP/1.1 layer (`Connection`) and what an application
implements to answer a request (`Exchange`). Runs on the daemon's event loop only; nothing
here blocks.

A `Connection` owns a `RequestParser` (`tsctl.server.api.http1.parser`) and is its owner: it
appends what arrives to the parser's buffer, asks the server's `route` for an exchange when a
head is parsed, passes the body on in pieces, and writes the exchange's answer: one response,
or a streamed one (chunked) ending with `end_stream`. One request is handled at a time per
connection; bytes a client pipelines behind it wait in the buffer until it is answered
(reading pauses past `MAX_PIPELINED`). One `data_received` call and one `transport.write` per
request: this is the inference API's hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from tsctl.errors import TsctlError
from tsctl.server.api.http1.parser import BUSY, CLOSED, RequestHead, RequestParser

if TYPE_CHECKING:
    from tsctl.server.api.http1.server import Server

log = logging.getLogger("tsctl.server")

#: bytes buffered behind a request in progress before reading pauses
MAX_PIPELINED = 1 << 20

#: the application's error funnel: (status, JSON body, extra headers) for an exception. A
#: request that breaks HTTP/1.1 raises `BadRequest` (400), `HeadTooLarge` (431) or
#: `UnsupportedTransferCoding` (501) while it is parsed; it is answered through the funnel
#: and the connection is closed
ErrorResponse = Callable[[BaseException], tuple[int, bytes, dict[str, str]]]


class Exchange:
    """One request's handling: override what you need. `conn` answers it."""

    def __init__(self, conn: Connection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head

    def body_limit(self) -> int | None:
        """Body bytes this request may send (None: no limit). Checked by the connection
        against `Content-Length` before the body is read, and as chunks arrive."""
        return None

    def headers_received(self) -> None:
        """The head is parsed; the body (if any) follows. May answer already."""

    def data_received(self, chunk: bytes) -> None:
        """A piece of the body."""

    def too_large(self, size: int | None) -> None:
        """The body is over `body_limit()` (`size` is the declared length when known).
        Must answer; the rest of the body is read and dropped."""

    def finish(self) -> None:
        """The whole body is in. Answer now or later."""

    def connection_lost(self) -> None:
        """The client went away before the answer was written (called even when the answer
        is already out: ignore it then)."""

    def refuse(self, exc: BaseException) -> None:
        """The request broke HTTP/1.1 after its head was read (a malformed chunked body), or
        handling it failed: answer `exc` (the connection closes after it)."""
        self.conn.refuse(exc)


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The `Date` header's value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _header_block(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        name, value = str(name), str(value)
        if "\n" in name or "\r" in name or "\n" in value or "\r" in value or not name:
            log.warning("dropped response header %r: it contains a line break", name)
            continue
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges one at a time. It is
    its parser's owner (`on_head`, `on_body`, `on_complete`)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.parser = RequestParser(self)
        self.exchange: Exchange | None = None
        self.head: RequestHead | None = None
        self.limit: int | None = None
        self.received = 0  # body bytes received for the current request
        self.discarding = False  # the body is over the limit: read it and drop it
        self.body_done = True  # the current request's body is all in
        self.parsing = False
        self.answered = False
        self.streaming = False
        self.chunked = False  # the streamed answer is sent in chunks (HTTP/1.1)
        self.close_after = False
        self.paused = False
        self.last_active = 0.0

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # answers are small and must leave at once
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"
        self.last_active = self.server.loop.time()
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.loop.time()
        parser = self.parser
        if parser.state == CLOSED:
            return
        parser.buffer += data
        if parser.state == BUSY:
            if len(parser.buffer) > MAX_PIPELINED and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            return
        self._parse()

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone client: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser.close()
        self.server.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            try:
                exchange.connection_lost()
            except Exception:
                log.exception("error while dropping a request whose client went away")

    def closed(self) -> bool:
        """For the batcher: whether this connection can still send requests."""
        return self.parser.state == CLOSED

    # --- parsing (the parser calls on_head, on_body and on_complete)

    def _parse(self) -> None:
        self.parsing = True
        try:
            self.parser.parse()
        except TsctlError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("error handling a request from %s", self.client)
            self._fail(exc)  # the funnel answers 500 without the details
        finally:
            self.parsing = False

    def on_head(self, head: RequestHead) -> None:
        """A request head: pick the exchange, set up reading the body."""
        self.head = head
        self.answered = False
        self.streaming = False
        self.close_after = not head.keep_alive
        self.received = 0
        self.discarding = False
        # None: chunked. Read after the reset above: a bad length is this request's to answer
        length = head.body_length()
        exchange = self.server.route(self, head)
        self.exchange = exchange
        self.limit = exchange.body_limit()
        self.body_done = False
        exchange.headers_received()
        if self.parser.state == CLOSED:
            return
        expects = head.get("expect").lower() == "100-continue"
        if self.limit is not None and length is not None and length > self.limit:
            self.discarding = True
            if expects or length > self.limit + self.server.discard_limit:
                # a client told "no" before sending may never send the body, and one too big
                # is not worth reading: answer, then close
                self.close_after = True
            exchange.too_large(length)
            if self.close_after:
                self._close_if_done()
                return
        if length != 0 and expects and not self.answered and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.parser.read_body(length)

    def on_body(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.discarding:
            if self.received > (self.limit or 0) + self.server.discard_limit:
                self.close_after = True
                self._close_if_done()
            return
        if self.limit is not None and self.received > self.limit:
            self.discarding = True
            assert self.exchange is not None
            self.exchange.too_large(None)
            return
        assert self.exchange is not None
        self.exchange.data_received(chunk)

    def on_complete(self) -> None:
        """The body is in: the exchange answers now or later; the parser waits for it."""
        self.body_done = True
        exchange = self.exchange
        if exchange is not None and not self.discarding:
            exchange.finish()
        if self.answered and not self.streaming:
            self._next()

    def _next(self) -> None:
        """The answer is written: go on with the next request, or close."""
        self.exchange = None
        if self.close_after or self.transport is None:
            self.close()
            return
        if self.parser.next_request():
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            if self.parser.buffer and not self.parsing:
                self.server.loop.call_soon(self._parse)

    def _close_if_done(self) -> None:
        if self.answered and not self.streaming:
            self.close()

    def close(self) -> None:
        """Close the connection now (the server's idle sweep and shutdown call it too)."""
        self.parser.close()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """Answer a broken request (when nothing was answered yet) and close."""
        self.close_after = True
        if not self.answered and self.transport is not None:
            if self.exchange is not None:
                self.exchange.refuse(exc)
            else:
                self.refuse(exc)
        self.close()

    def refuse(self, exc: BaseException) -> None:
        """Answer `exc` through the server's error funnel."""
        status, body, extra = self.server.error_response(exc)
        self.respond(status, {"Content-Type": "application/json", **extra}, body)

    # --- answering (called by exchanges)

    def respond(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes | bytearray | memoryview,
        reason: str | None = None,
    ) -> bool:
        """Write the whole answer. False if it could not be (already answered, or gone)."""
        if self.answered:
            return False
        self.answered = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        items = list(headers.items())
        items.append(("Content-Length", str(len(body))))
        items.append(("Date", http_date()))
        if self.close_after:
            items.append(("Connection", "close"))
        elif self.head is not None and self.head.version == "HTTP/1.0":
            items.append(("Connection", "keep-alive"))
        block = _header_block(status, reason or reason_phrase(status), items)
        if self.head is not None and self.head.method == "HEAD":
            transport.write(block)  # the length a GET would have had, and no body
        else:
            transport.write(block + body)
        if self.body_done:  # else: answered early, the rest of the body is read and dropped
            self._next()
        return True

    def start_stream(
        self, status: int, headers: dict[str, str], first: bytes, reason: str | None = None
    ) -> bool:
        """Begin an answer sent in pieces (chunked for HTTP/1.1, else until close)."""
        if self.answered or self.transport is None or self.transport.is_closing():
            return False
        self.answered = True
        self.streaming = True
        self.chunked = self.head is not None and self.head.version == "HTTP/1.1"
        items = list(headers.items())
        items.append(("Date", http_date()))
        if self.chunked:
            items.append(("Transfer-Encoding", "chunked"))
        else:  # an HTTP/1.0 client reads the answer until the connection closes
            self.close_after = True
        if self.close_after:
            items.append(("Connection", "close"))
        self.transport.write(_header_block(status, reason or reason_phrase(status), items))
        self.stream(first)
        return True

    def stream(self, piece: bytes) -> None:
        if not self.streaming or self.transport is None or self.transport.is_closing():
            return
        if not piece:
            return
        if self.chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        else:
            self.transport.write(piece)

    def end_stream(self, last: bytes = b"") -> None:
        if not self.streaming:
            return
        self.stream(last)
        self.streaming = False
        transport = self.transport
        if self.chunked and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
        if self.body_done:
            self._next()
