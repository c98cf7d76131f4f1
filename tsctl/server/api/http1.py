"""A small HTTP/1.1 server on asyncio's `Protocol`, for the inference API's hot path.

Runs on the daemon's event loop. One `Connection` per client socket parses requests from the
bytes as they arrive (request line, headers, a `Content-Length` or chunked body) and hands each
to an `Exchange` that the application's `route` picks from the request head alone. The
exchange receives the body in pieces, then answers through the connection: one response, or
a streamed one (chunked) ending with `end_stream`. One request is handled at a time per
connection; bytes a client pipelines behind it wait in the buffer until it is answered.

Why not tornado here: its `HTTP1Connection` and `IOStream` cost most of the frontend's CPU per
request in the benchmark (coroutines per message, an `add_reader`/`remove_reader` pair and a
close callback per request). This module does the same job with one `data_received` call and
one `transport.write` per request. The management and metrics APIs stay on tornado.

What it does not do, on purpose: TLS (tsctl refuses https addresses), HTTP/2 (gRPC has its
own port), request trailers (read and dropped), transfer codings other than chunked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus

from tsctl.errors import BadRequest, TsctlError

log = logging.getLogger("tsctl.server")

#: the largest request head (request line plus headers) read before answering 431
MAX_HEAD = 64 * 1024
#: bytes buffered behind a request in progress before reading pauses
MAX_PIPELINED = 1 << 20
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?$")

# parser states
_HEAD, _BODY, _CHUNK_HEAD, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _BUSY, _CLOSED = range(8)


class HeadTooLarge(BadRequest):
    """A request head over `MAX_HEAD`."""

    http_status = 431


class UnsupportedTransferCoding(BadRequest):
    """A transfer coding other than chunked."""

    http_status = 501


#: the application's error funnel: (status, JSON body, extra headers) for an exception. A
#: request that breaks HTTP/1.1 raises `BadRequest` (400) or one of the two above while it is
#: parsed; it is answered through the funnel and the connection is closed
ErrorResponse = Callable[[BaseException], tuple[int, bytes, dict[str, str]]]


class RequestHead:
    """A parsed request line and its headers (names as sent; `get` is case-insensitive)."""

    __slots__ = ("_index", "headers", "keep_alive", "method", "path", "target", "version")

    def __init__(
        self, method: str, target: str, version: str, headers: list[tuple[str, str]]
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.partition("?")[0]
        self.version = version
        self.headers = headers
        index: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            index[key] = f"{index[key]},{value}" if key in index else value
        self._index = index
        connection = index.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection

    def get(self, name: str, default: str = "") -> str:
        return self._index.get(name.lower(), default)


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
    """One client connection: parses requests, runs their exchanges one at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.buffer = bytearray()
        self.state = _HEAD
        self.exchange: Exchange | None = None
        self.head: RequestHead | None = None
        self.remaining = 0  # body bytes (or chunk bytes) still to read
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
        if self.state == _CLOSED:
            return
        self.buffer += data
        if self.state == _BUSY:
            if len(self.buffer) > MAX_PIPELINED and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            return
        self._parse()

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone client: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self.server.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            try:
                exchange.connection_lost()
            except Exception:
                log.exception("error while dropping a request whose client went away")

    def closed(self) -> bool:
        """For the batcher: whether this connection can still send requests."""
        return self.state == _CLOSED

    # --- parsing

    def _parse(self) -> None:
        self.parsing = True
        try:
            while self.state not in (_BUSY, _CLOSED):
                if not self._step():
                    return
        except TsctlError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("error handling a request from %s", self.client)
            self._fail(exc)  # the funnel answers 500 without the details
        finally:
            self.parsing = False

    def _step(self) -> bool:
        """Consume what the buffer allows in the current state; False when more is needed."""
        buf = self.buffer
        state = self.state
        if state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HeadTooLarge("the request head is over 64 KiB")
                if buf[:2] == b"\r\n":  # tolerate blank lines between requests
                    del buf[:2]
                    return True
                return False
            if end > MAX_HEAD:
                raise HeadTooLarge("the request head is over 64 KiB")
            raw = bytes(buf[:end])
            del buf[: end + 4]
            if not raw:
                return True
            self._start(raw)
            return True
        if state in (_BODY, _CHUNK_DATA):  # `remaining` bytes of body (or of this chunk)
            if not buf:
                return False
            take = min(self.remaining, len(buf))
            self._body(bytes(buf[:take]))
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0 and state == _BODY:
                self._complete()
            elif self.remaining == 0:
                self.state = _CHUNK_END
            return True
        if state == _CHUNK_HEAD:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    raise BadRequest("malformed chunked body: chunk size line too long")
                return False
            line = bytes(buf[:end]).strip()
            match = _CHUNK_SIZE.match(line)
            if match is None:
                raise BadRequest(f"malformed chunked body: bad chunk size {line[:40]!r}")
            del buf[: end + 2]
            size = int(match.group(1), 16)
            if size == 0:
                self.state = _TRAILERS
            else:
                self.remaining = size
                self.state = _CHUNK_DATA
            return True
        if state == _CHUNK_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise BadRequest(
                    f"malformed chunked body: chunk followed by {bytes(buf[:2])!r}, not CRLF"
                )
            del buf[:2]
            self.state = _CHUNK_HEAD
            return True
        if state == _TRAILERS:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HeadTooLarge("the request trailers are over 64 KiB")
                return False
            del buf[: end + 2]
            if end == 0:  # the empty line after the (ignored) trailers
                self._complete()
            return True
        return False

    def _start(self, raw: bytes) -> None:
        """A request head: parse it, pick the exchange, set up reading the body."""
        lines = raw.split(b"\r\n")
        request_line = lines[0].split(b" ")
        if (
            len(request_line) != 3
            or not request_line[2].startswith(b"HTTP/1.")
            or not _TOKEN.match(request_line[0])
            or not request_line[1]
        ):
            raise BadRequest(f"malformed HTTP request line {lines[0][:80]!r}")
        method, target, version = (part.decode("latin-1") for part in request_line)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):  # obsolete line folding: continues the last value
                if not headers:
                    raise BadRequest("malformed HTTP header: a continuation line comes first")
                last, folded = headers[-1]
                headers[-1] = (last, f"{folded} {line.strip().decode('latin-1')}")
                continue
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise BadRequest(f"malformed HTTP header line {line[:80]!r}")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        head = RequestHead(method, target, version, headers)
        self.head = head
        self.answered = False
        self.streaming = False
        self.close_after = not head.keep_alive
        self.received = 0
        self.discarding = False
        chunked = head.get("transfer-encoding").lower()
        declared = head.get("content-length")
        if chunked:
            if declared:
                raise BadRequest("both Content-Length and Transfer-Encoding were sent")
            if chunked != "chunked":
                raise UnsupportedTransferCoding(f"unsupported Transfer-Encoding {chunked!r}")
        length = 0
        if declared:
            values = {value.strip() for value in declared.split(",")}  # the same one twice is ok
            if len(values) != 1 or not (single := values.pop()).isdigit():
                raise BadRequest(f"malformed Content-Length {declared[:40]!r}")
            length = int(single)
        exchange = self.server.route(self, head)
        self.exchange = exchange
        self.limit = exchange.body_limit()
        self.state = _BUSY  # until the body, if any, is being read
        self.body_done = False
        exchange.headers_received()
        if self.state == _CLOSED:
            return
        expects = head.get("expect").lower() == "100-continue"
        if self.limit is not None and length > self.limit:
            self.discarding = True
            if expects or length > self.limit + self.server.discard_limit:
                # a client told "no" before sending may never send the body, and one too big
                # is not worth reading: answer, then close
                self.close_after = True
            exchange.too_large(length)
            if self.close_after:
                self._close_if_done()
                return
        if (length or chunked) and expects and not self.answered and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            self.state = _CHUNK_HEAD
        elif length:
            self.remaining = length
            self.state = _BODY
        else:
            self._complete()

    def _body(self, chunk: bytes) -> None:
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

    def _complete(self) -> None:
        """The body is in: the exchange answers now or later; the parser waits for it."""
        self.state = _BUSY
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
            self._close()
            return
        if self.state == _BUSY:
            self.state = _HEAD
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            if self.buffer and not self.parsing:
                self.server.loop.call_soon(self._parse)

    def _close_if_done(self) -> None:
        if self.answered and not self.streaming:
            self._close()

    def _close(self) -> None:
        self.state = _CLOSED
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
        self._close()

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


class Server:
    """Serves a `route` function on listening sockets with `Connection`s."""

    def __init__(
        self,
        route: Callable[[Connection, RequestHead], Exchange],
        error_response: ErrorResponse,
        discard_limit: int,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.route = route
        self.error_response = error_response
        self.discard_limit = discard_limit
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def add_sockets(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            listener = await self.loop.create_server(
                lambda: Connection(self), sock=sock, backlog=1024
            )
            self.listeners.append(listener)
        self._sweeper = self.loop.call_later(60, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle (no request in progress) for longer than the timeout."""
        cutoff = self.loop.time() - self.idle_timeout
        for conn in list(self.connections):
            if conn.state == _HEAD and not conn.buffer and conn.last_active < cutoff:
                conn._close()
        self._sweeper = self.loop.call_later(60, self._sweep)

    def stop(self) -> None:
        """Stop accepting connections."""
        for listener in self.listeners:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def close_all_connections(self) -> None:
        for conn in list(self.connections):
            conn._close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
