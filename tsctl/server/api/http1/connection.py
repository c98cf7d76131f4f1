"""One client connection of the HTTP/1.1 layer (`Connection`) and what an application
implements to answer a request (`Exchange`). Runs on the daemon's event loop only; nothing
here blocks.

A `Connection` feeds what it receives to its `RequestParser` (`tsctl.server.api.http1.parser`)
and is the parser's owner: it asks the server's `route` for an exchange when a head is parsed,
passes the body on in pieces, and writes the exchange's answer: one response (one
`transport.write`), or a streamed one (chunked) ending with `end_stream`.

One request is handled at a time. What a client pipelines behind it is parsed at most a piece
(`parser.PIECE`) ahead and waits, parsed (`waiting`) or not (`unparsed`); reading pauses once
`MAX_UNPARSED` bytes wait, and while the transport's write buffer is over its high-water mark
(`pause_writing`), so a client that sends and never reads holds a bounded amount of memory.
After each answer a request that waits behind it starts on the next turn of the loop, never
inside the same `data_received`: other connections and APIs on the loop get their turn (when
none waits and no parse is under way, the connection is ready for the next at once).

Time limits (`Limits`, checked by the server's sweep): a request head must arrive within the
header timeout of its first byte and its body within the body timeout of the head (else 408
and close); a connection with no request in progress is closed after the keep-alive timeout,
and one whose client has not read its answers for that long is dropped. A request answered
before its body is read (refused early: unknown model, not authorized, too large) is answered
with `Connection: close`, never gets `100 Continue`, and its body is read and dropped (never
kept) for at most `LINGER` seconds or `Limits.discard_limit` bytes before the connection
closes: closing at once would reset the connection and could lose the answer.

Stopping (`Server.stop`, the daemon's drain): a connection with no request in progress is
closed at once, one with a request in progress answers it with `Connection: close`, then
closes. A client or proxy so sees the connection end before it sends a next request on it,
rather than have that request refused (503) by a server that is going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from tsctl.errors import TsctlError
from tsctl.server.api.http1.parser import PIECE, RequestHead, RequestParser

if TYPE_CHECKING:
    from tsctl.server.api.http1.server import Server

log = logging.getLogger("tsctl.server")

#: bytes received behind the requests in progress and not parsed yet before reading pauses
MAX_UNPARSED = 64 * 1024
#: the longest a connection reads and drops the body of a request it answered early (seconds)
LINGER = 5.0

#: the application's error funnel: (status, JSON body, extra headers) for an exception. A
#: request that breaks HTTP/1.1 raises `BadRequest` (400), `HeadTooLarge` (431) or
#: `UnsupportedTransferCoding` (501) while it is parsed, and one too slow `RequestTimeout`
#: (408); it is answered through the funnel and the connection is closed
ErrorResponse = Callable[[BaseException], tuple[int, bytes, dict[str, str]]]

#: what a connection's deadline is for: nothing; between requests (keep-alive); a head; a
#: body; dropping a refused body before closing
NONE, IDLE, HEAD, BODY, LINGERING = range(5)

#: response headers the layer sets itself: an application's are dropped
_FRAMING = frozenset(("content-length", "transfer-encoding"))
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # also what a reason phrase may hold


class RequestTimeout(TsctlError):
    """A client took longer than a time limit to send a request's head or body."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
    type_name = "RequestTimeoutException"


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
        """The head is parsed; the body (if any) follows. May answer already: a request
        known to fail is answered before its body is read (the connection then closes)."""

    def data_received(self, chunk: bytes) -> None:
        """A piece of the body."""

    def too_large(self, size: int | None) -> None:
        """The body is over `body_limit()` (`size` is the declared length when known).
        Must answer; the rest of the body is not read."""

    def finish(self) -> None:
        """The whole body is in. Answer now or later."""

    def connection_lost(self) -> None:
        """The client went away before the answer was written (called even when the answer
        is already out: ignore it then)."""

    def refuse(self, exc: BaseException) -> None:
        """The request broke HTTP/1.1 after its head was read (a malformed chunked body, a
        body timeout), or handling it failed: answer `exc` (the connection closes after)."""
        self.conn.refuse(exc)


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: tuple[int, str, bytes] = (0, "", b"")


def http_date() -> str:
    """The `Date` header's value, formatted once per second."""
    return _date()[1]


def _date() -> tuple[int, str, bytes]:
    """(second, `Date` value, `Date` header line), formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        value = formatdate(now, usegmt=True)
        _date_cache = (now, value, f"Date: {value}\r\n".encode("latin-1"))
    return _date_cache


def status_line(status: int, reason: str | None) -> str:
    """`HTTP/1.1 <status> <reason>`: an application's reason phrase when it is one (no line
    break, no control character), else the standard one."""
    if not reason or not _is_field_value(reason):
        reason = reason_phrase(status)
    return f"HTTP/1.1 {status} {reason}\r\n"


@functools.lru_cache(maxsize=128)
def _standard_status_line(status: int) -> bytes:
    return status_line(status, None).encode("latin-1")


def _status_line_bytes(status: int, reason: str | None) -> bytes:
    if not reason and 100 <= status <= 999:
        return _standard_status_line(status)
    return status_line(status, reason).encode("latin-1", "replace")


@functools.lru_cache(maxsize=256)
def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def _is_field_value(value: str) -> bool:
    # `isprintable` (C, fast) is false for every control character and line break; a tab,
    # which a value may hold, takes the slower check
    return value.isprintable() or _FIELD_VALUE.fullmatch(value) is not None


def header_block(
    status: int, reason: str | None, headers: Iterable[tuple[str, str]], trusted: str = ""
) -> bytes:
    """The status line, the headers, then `trusted` (header lines the layer made itself). A
    header that is not a token with a field value is dropped (and logged): nothing an
    application sets can split or forge a header."""
    return _status_line_bytes(status, reason) + header_lines(headers, trusted) + b"\r\n"


def header_lines(headers: Iterable[tuple[str, str]], trusted: str = "") -> bytes:
    """`headers` as `Name: value` lines, then `trusted`; a header that is not a token with a
    field value is dropped (and logged). What `Connection.respond` takes as `lead` is made
    here, or of values known to be tokens."""
    lines = []
    for name, value in headers:
        name, value = str(name), str(value)
        if not _is_token(name) or not _is_field_value(value):
            log.warning(
                "dropped response header %r: a bad name, or a line break or control "
                "character in its value",
                name[:80],
            )
            continue
        lines.append(f"{name}: {value}\r\n")
    lines.append(trusted)
    return "".join(lines).encode("latin-1", "replace")


def _application_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """An application's headers less those that frame the message (the layer sets them)."""
    return [(n, v) for n, v in headers.items() if str(n).lower() not in _FRAMING]


class _Waiting:
    """A request parsed behind the one in progress: its head, its body so far."""

    __slots__ = ("chunks", "complete", "head")

    def __init__(self, head: RequestHead) -> None:
        self.head = head
        self.chunks: list[bytes] = []
        self.complete = False


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges one at a time. It is
    its parser's owner (`on_begin`, `on_head`, `on_body`, `on_complete`)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.parser = RequestParser(self)
        #: received, not parsed yet (requests wait ahead of it)
        self.unparsed = bytearray()
        #: parsed requests behind the one in progress
        self.waiting: deque[_Waiting] = deque()
        # the request in progress
        self.exchange: Exchange | None = None
        self.head: RequestHead | None = None
        self.limit: int | None = None
        self.received = 0  # its body bytes so far
        self.body_pending = False  # its body is still to come
        self.body_done = True  # its body is all in
        self.in_progress = False  # from its head until its answer is written
        self.answered = False
        self.streaming = False
        self.chunked = False  # the streamed answer is sent in chunks (HTTP/1.1)
        self.close_after = False
        # the connection
        self.draining = False  # the server stops: no request after the one in progress
        self.holding = False  # answered: the next request starts on the loop's next turn
        #: the parser is being fed (an answer written now must not start the next request)
        self.feeding = False
        self.lingering = False  # answered early: the body is dropped until the close
        self.discarded = 0
        self.reading = True
        self.write_paused = False
        self.write_paused_at = 0.0
        #: when the current time limit runs out (loop time), and which limit it is
        self.deadline = math.inf
        self.deadline_kind = NONE
        self._closed = False
        self._admitted = False
        self._close_callbacks: set[Callable[[Connection], None]] = set()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio's in all but their classes
        self.transport = transport = cast(asyncio.Transport, transport)
        if not self.server.admit(self):  # over max_connections: closed at once
            self._closed = True
            self.parser.close()
            transport.close()
            return
        self._admitted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # answers are small and must leave at once
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"
        self._wait(IDLE)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.discarded += len(data)
            if self.discarded > self.server.limits.discard_limit:
                self.close()
            return
        if self._closed:
            return
        if self.unparsed or self.waiting or self.holding:
            self.unparsed += data  # parsed when the requests ahead are answered
            self._update_reading()
            return
        self._feed(data)

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone client: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self.server.release(self)
        self._closed = True
        self.parser.close()
        self.waiting.clear()
        self.unparsed.clear()
        self.deadline = math.inf
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            try:
                exchange.connection_lost()
            except Exception:
                log.exception("error while dropping a request whose client went away")
        callbacks, self._close_callbacks = self._close_callbacks, set()
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("error in a callback of a closed connection")

    def pause_writing(self) -> None:
        """The transport's write buffer is over its high-water mark: start nothing new and
        stop reading until it drains."""
        self.write_paused = True
        self.write_paused_at = self.loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        if not self.in_progress and not self.holding and not self._closed:
            self.holding = True
            self.loop.call_soon(self._resume)

    def closed(self) -> bool:
        """For the batcher: whether this connection can still send requests."""
        return self._closed

    def when_closed(self, callback: Callable[[Connection], None]) -> None:
        """Call `callback(self)` once the connection is lost (at once if it is). A callback
        added twice is called once (the batcher's queues add theirs per request)."""
        if self._closed:
            callback(self)
        else:
            self._close_callbacks.add(callback)

    # --- feeding the parser

    def _feed(self, data: bytes | bytearray) -> None:
        """Parse `data` a piece at a time while no parsed request waits; keep the rest."""
        self.feeding = True
        if len(data) <= PIECE:  # the common case: one request, or part of a body
            try:
                self.parser.feed(data)
            except Exception as exc:
                self.feeding = False
                self._crash(exc)
                return
            self.feeding = False
            self._update_reading()
            return
        view = memoryview(data)
        pos, size = 0, len(view)
        try:
            while pos < size and not self.waiting and not self._closed and not self.lingering:
                self.parser.feed(view[pos : pos + PIECE])
                pos += PIECE
        except Exception as exc:
            self.feeding = False
            self._crash(exc)
            return
        finally:
            self.feeding = False
            if pos < size and not self._closed and not self.lingering:
                self.unparsed += view[pos:]
        self._update_reading()

    def _pump(self) -> None:
        """Parse what waits unparsed, now that no parsed request waits."""
        if self.unparsed and not self.waiting and not self._closed and not self.lingering:
            data = bytes(self.unparsed)
            self.unparsed.clear()
            self._feed(data)
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        pause = not self.lingering and (self.write_paused or len(self.unparsed) > MAX_UNPARSED)
        if pause and self.reading:
            self.reading = False
            transport.pause_reading()
        elif not pause and not self.reading:
            self.reading = True
            transport.resume_reading()

    def _crash(self, exc: BaseException) -> None:
        """A request broke HTTP/1.1, or handling it raised: answer it and close."""
        if not isinstance(exc, TsctlError):
            log.error(
                "error handling a request from %s",
                self.client,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        self._fail(exc)  # the funnel answers 500 without the details

    # --- the parser's callbacks

    def on_begin(self) -> None:
        if not self.in_progress and not self.holding and not self.waiting:
            self._wait(HEAD)

    def on_head(self, head: RequestHead) -> None:
        if self.in_progress or self.holding or self.waiting or self.write_paused:
            self.waiting.append(_Waiting(head))  # pipelined: its turn comes
            return
        self._start(head)

    def on_body(self, chunk: bytes) -> None:
        if self.waiting:
            self.waiting[-1].chunks.append(chunk)
        else:
            self._body(chunk)

    def on_complete(self) -> None:
        if self.waiting:
            self.waiting[-1].complete = True
        else:
            self._complete()

    # --- one request

    def _start(self, head: RequestHead) -> None:
        """A request head: pick the exchange, refuse it early or set up reading the body."""
        self.in_progress = True
        self.head = head
        self.exchange = None
        self.answered = False
        self.streaming = False
        self.close_after = self.draining or not head.keep_alive
        self.received = 0
        self.body_done = False
        # None: chunked. Read after the reset above: a bad length is this request's to answer
        length = head.body_length()
        self.body_pending = length != 0
        exchange = self.server.route(self, head)
        self.exchange = exchange
        self.limit = exchange.body_limit()
        exchange.headers_received()
        if self.answered or self._closed:
            return  # refused before the body: `respond` closes without reading it
        if self.limit is not None and length is not None and length > self.limit:
            exchange.too_large(length)
            return
        if not self.body_pending:
            self._wait(NONE)
            return
        self._wait(BODY)
        if head.fields.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.answered or self.lingering or self.exchange is None:
            return
        if self.limit is not None and self.received > self.limit:
            self.exchange.too_large(None)
            return
        self.exchange.data_received(chunk)

    def _complete(self) -> None:
        """The body is in: the exchange answers now or later."""
        self.body_pending = False
        self.body_done = True
        if self.lingering or self.exchange is None:
            return
        self._wait(NONE)
        if not self.answered:
            self.exchange.finish()  # an answer written now moves on by itself
        elif not self.streaming:
            self._next()

    def _next(self) -> None:
        """The answer is written: go on with the next request (on the loop's next turn),
        or close."""
        if not self.in_progress:
            return
        self.in_progress = False
        self.exchange = None
        if self.close_after or self.transport is None:
            self.close()
            return
        if not (self.feeding or self.waiting or self.unparsed or self.write_paused):
            # answered from the loop (not from inside a `data_received`) and nothing waits
            # behind it: the next request starts when it arrives, no turn to wait for
            self._wait(HEAD if self.parser.in_head else IDLE)
            self._update_reading()
            return
        self.holding = True
        self._wait(IDLE)
        self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        """Start the next request that waits, or parse on."""
        self.holding = False
        if self._closed or self.lingering or self.in_progress:
            return
        if self.write_paused:
            self._update_reading()  # `resume_writing` goes on
            return
        try:
            if self.waiting:
                item = self.waiting.popleft()
                self._start(item.head)
                for chunk in item.chunks:
                    self._body(chunk)
                if item.complete:
                    self._complete()
        except Exception as exc:
            self._crash(exc)
            return
        if not self.waiting and not self.holding:
            self._pump()
        if not self.in_progress and not self.holding and not self.waiting:
            kind = HEAD if self.parser.in_head else IDLE
            if kind != self.deadline_kind:
                self._wait(kind)

    def _linger(self) -> None:
        """Answered before the body was read: read no more requests, drop what still comes
        (bounded), close once the client closes or `LINGER` runs out."""
        self.lingering = True
        self.close_after = True
        self.in_progress = False
        self.exchange = None
        self.parser.close()
        self.waiting.clear()
        self.unparsed.clear()
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()  # the answer, then FIN: the client sees the end
        self._wait(LINGERING)
        if not self.reading and transport is not None:
            self.reading = True
            transport.resume_reading()

    # --- time limits (the server's sweep calls `timed_out`)

    def _wait(self, kind: int) -> None:
        self.deadline_kind = kind
        # the loop's clock (`loop.time()` is `time.monotonic()`), read without a Python call
        self.deadline = time.monotonic() + self.server.timeouts[kind]  # NONE: math.inf

    def timed_out(self) -> None:
        kind = self.deadline_kind
        self.deadline, self.deadline_kind = math.inf, NONE
        limits = self.server.limits
        if kind == HEAD:
            self._fail(
                RequestTimeout(
                    f"the request head did not arrive within {limits.header_timeout:g} s"
                )
            )
        elif kind == BODY:
            self._fail(
                RequestTimeout(f"the request body did not arrive within {limits.body_timeout:g} s")
            )
        else:  # idle for the keep-alive timeout, or done lingering
            self.close()

    # --- closing

    def drain(self) -> None:
        """The server is stopping: close now when no request is in progress and none has
        begun to arrive (cleanly, with the last answer sent: the client sees the end before it
        sends another request), else after the answer in progress, which says
        `Connection: close`. One whose client is not reading its answers is left as is."""
        self.draining = True
        self.close_after = True
        if self._closed or self.lingering or self.write_paused:
            return
        if not (self.in_progress or self.waiting or self.unparsed or self.parser.in_head):
            self.close()

    def close(self) -> None:
        """Close the connection now (the server's sweep and shutdown call it too)."""
        self._closed = True
        self.parser.close()
        if self.transport is not None:
            if self.write_paused:
                self.transport.abort()  # its client reads nothing: do not wait to flush
            else:
                self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """Answer a broken request (when nothing was answered yet) and close."""
        self.close_after = True
        if not self.answered and self.transport is not None and not self._closed:
            if self.exchange is not None and self.in_progress:
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
        lead: bytes = b"",
    ) -> bool:
        """Write the whole answer, in one `transport.write`. False if it could not be
        (already answered, or gone). `lead`: header lines sent first, made by `header_lines`
        (or of values known to be safe) once for many answers; `headers` are checked here."""
        if self.answered:
            return False
        self.answered = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.body_pending:  # answered before the body: it will not be read
            self.close_after = True
        head = self.head
        size = memoryview(body).nbytes
        if self.close_after:
            framing = b"Content-Length: %d\r\n%bConnection: close\r\n\r\n"
        elif head is not None and head.version == "HTTP/1.0":
            framing = b"Content-Length: %d\r\n%bConnection: keep-alive\r\n\r\n"
        else:
            framing = b"Content-Length: %d\r\n%b\r\n"
        pieces: list[bytes | bytearray | memoryview] = [
            _status_line_bytes(status, reason),
            lead,
            header_lines(_application_headers(headers)) if headers else b"",
            framing % (size, _date()[2]),
        ]
        if head is None or head.method != "HEAD":  # HEAD: the length a GET would have had
            pieces.append(body)
        transport.write(b"".join(pieces))
        if self.body_pending:
            self._linger()
        elif self.body_done:
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
        items = _application_headers(headers)
        items.append(("Date", http_date()))
        if self.chunked:
            items.append(("Transfer-Encoding", "chunked"))
        else:  # an HTTP/1.0 client reads the answer until the connection closes
            self.close_after = True
        if self.body_pending:
            self.close_after = True
        if self.close_after:
            items.append(("Connection", "close"))
        self.transport.write(header_block(status, reason, items))
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
        if self.body_pending:
            self.close()
        elif self.body_done:
            self._next()
