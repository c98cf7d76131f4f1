"""HTTP/1.1 request framing for `tsctl.server.api.http1`, without sockets or an event loop.

Bytes in, events out. The owner appends what the client sent to `RequestParser.buffer` and
calls `parse()`; the parser consumes what it can and calls its owner back, synchronously, with
each request head (`on_head`), each piece of the body (`on_body`) and the end of the body
(`on_complete`). It reads a `Content-Length` body or a chunked one (chunk extensions and
trailers are read and dropped), tolerates blank lines between requests and obsolete header
folding. A request that breaks HTTP/1.1 raises `BadRequest` (400), `HeadTooLarge` (431) or
`UnsupportedTransferCoding` (501) with a message naming the bad value: out of `parse()`, or
out of `RequestHead.body_length()` for a bad `Content-Length`/`Transfer-Encoding`. The parser
is then of no further use (the owner answers and closes the connection).

One request at a time: after a head the parser waits (`BUSY`) until its owner says how to read
the body (`read_body`, usually with `RequestHead.body_length()`), and after the body until its
owner has answered (`next_request`); bytes a client pipelines behind a request stay in the
buffer meanwhile. The callbacks may call `read_body`, `next_request` and `close` themselves.

No I/O, no clock, no locks: it runs on its owner's thread (for `http1.Connection`, the daemon's
event loop) and never blocks; its callbacks must not block either.
"""

from __future__ import annotations

import re
from typing import Protocol

from tsctl.errors import BadRequest

#: the largest request head (request line plus headers) read before answering 431
MAX_HEAD = 64 * 1024
#: the longest chunk-size line (with its extensions) read before refusing the body
MAX_CHUNK_LINE = 4096
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?$")

#: parser states: reading a head; a `Content-Length` body; a chunk-size line; a chunk's data;
#: the CRLF after a chunk; the trailers; waiting for the owner (`read_body`, `next_request`);
#: closed for good
HEAD, BODY, CHUNK_HEAD, CHUNK_DATA, CHUNK_END, TRAILERS, BUSY, CLOSED = range(8)


class HeadTooLarge(BadRequest):
    """A request head (or its trailers) over `MAX_HEAD`."""

    http_status = 431


class UnsupportedTransferCoding(BadRequest):
    """A transfer coding other than chunked."""

    http_status = 501


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

    def body_length(self) -> int | None:
        """How the body is framed: its `Content-Length` (0: no body), or None when chunked.
        `BadRequest` for a malformed or ambiguous length, `UnsupportedTransferCoding` for a
        coding other than chunked."""
        chunked = self.get("transfer-encoding").lower()
        declared = self.get("content-length")
        if chunked:
            if declared:
                raise BadRequest("both Content-Length and Transfer-Encoding were sent")
            if chunked != "chunked":
                raise UnsupportedTransferCoding(f"unsupported Transfer-Encoding {chunked!r}")
            return None
        if not declared:
            return 0
        values = {value.strip() for value in declared.split(",")}  # the same one twice is ok
        if len(values) != 1 or not (single := values.pop()).isdigit():
            raise BadRequest(f"malformed Content-Length {declared[:40]!r}")
        return int(single)


class ParserOwner(Protocol):
    """What a `RequestParser` calls back (synchronously, from `parse()` or `read_body`)."""

    def on_head(self, head: RequestHead) -> None:
        """A request head; the parser waits until `read_body` (or `close`)."""

    def on_body(self, chunk: bytes) -> None:
        """A piece of the body (a copy: the buffer moves on)."""

    def on_complete(self) -> None:
        """The body is in (or there was none); the parser waits until `next_request`."""


class RequestParser:
    """The framing state of one connection's requests (see the module docstring)."""

    __slots__ = ("buffer", "owner", "remaining", "state")

    def __init__(self, owner: ParserOwner) -> None:
        self.owner = owner
        #: bytes received and not consumed yet: the owner appends to it
        self.buffer = bytearray()
        self.state = HEAD
        self.remaining = 0  # body bytes (or chunk bytes) still to read

    def parse(self) -> None:
        """Consume the buffer as far as it goes (or until the parser waits or is closed)."""
        while self.state not in (BUSY, CLOSED):
            if not self._step():
                return

    def read_body(self, length: int | None) -> None:
        """After `on_head`: read a body of `length` bytes (0: none, `on_complete` at once;
        None: chunked). The bytes are read on the next `parse()`."""
        if length is None:
            self.state = CHUNK_HEAD
        elif length:
            self.remaining = length
            self.state = BODY
        else:
            self._complete()

    def next_request(self) -> bool:
        """After `on_complete`: read the next request head. False if the parser was not
        waiting for that (closed, or still in a request)."""
        if self.state != BUSY:
            return False
        self.state = HEAD
        return True

    def close(self) -> None:
        """Stop for good: `parse()` consumes nothing more."""
        self.state = CLOSED

    def idle(self) -> bool:
        """Between requests, with nothing of the next one received."""
        return self.state == HEAD and not self.buffer

    def _complete(self) -> None:
        self.state = BUSY
        self.owner.on_complete()

    def _step(self) -> bool:
        """Consume what the buffer allows in the current state; False when more is needed."""
        buf = self.buffer
        state = self.state
        if state == HEAD:
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
            self._head(raw)
            return True
        if state in (BODY, CHUNK_DATA):  # `remaining` bytes of body (or of this chunk)
            if not buf:
                return False
            take = min(self.remaining, len(buf))
            self.owner.on_body(bytes(buf[:take]))
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0 and state == BODY:
                self._complete()
            elif self.remaining == 0:
                self.state = CHUNK_END
            return True
        if state == CHUNK_HEAD:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise BadRequest("malformed chunked body: chunk size line too long")
                return False
            line = bytes(buf[:end]).strip()
            match = _CHUNK_SIZE.match(line)
            if match is None:
                raise BadRequest(f"malformed chunked body: bad chunk size {line[:40]!r}")
            del buf[: end + 2]
            size = int(match.group(1), 16)
            if size == 0:
                self.state = TRAILERS
            else:
                self.remaining = size
                self.state = CHUNK_DATA
            return True
        if state == CHUNK_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise BadRequest(
                    f"malformed chunked body: chunk followed by {bytes(buf[:2])!r}, not CRLF"
                )
            del buf[:2]
            self.state = CHUNK_HEAD
            return True
        if state == TRAILERS:
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

    def _head(self, raw: bytes) -> None:
        """A request head: parse it, wait, and hand it to the owner."""
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
        self.state = BUSY  # until the owner reads the body (or refuses it)
        self.owner.on_head(RequestHead(method, target, version, headers))
