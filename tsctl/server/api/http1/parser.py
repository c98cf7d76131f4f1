"""HTTP/1.1 request framing for `tsctl.server.api.http1`, without sockets or an event loop.

Bytes in, events out: the owner calls `RequestParser.feed` with what the client sent, and the
parser calls it back, synchronously, at the first byte of a request (`on_begin`), with each
request head (`on_head`), each piece of the body (`on_body`) and at the end of the body
(`on_complete`). The framing itself is llhttp's (through `httptools`, the parser Node.js
uses), run strictly: no obsolete line folding, no bare LF or CR, no control characters in the
target or in header values, one `Content-Length` made of ASCII digits, never beside
`Transfer-Encoding`. What llhttp does not decide is checked here: the HTTP version (1.0 and
1.1 only), transfer codings other than chunked (501), and the head's size (431 past
`MAX_HEAD`, counted on what is stored, and on the bytes fed while a head is incomplete, so an
endless header value is refused too).

A request that breaks HTTP/1.1 raises `BadRequest` (400), `HeadTooLarge` (431) or
`UnsupportedTransferCoding` (501) out of `feed`, with a message that names what is wrong and
echoes nothing the client sent; an exception a callback raises comes out of `feed` as it was
raised. Either way the parser is then of no further use (the owner answers and closes).

The parser delivers every request it finds in what it is fed: holding pipelined requests back
is the owner's business (`http1.Connection` feeds at most a slice at a time and stops while a
request waits). After a request that does not keep the connection alive (`Connection: close`,
HTTP/1.0, an upgrade), whatever follows is ignored.

No I/O, no clock, no locks: it runs on its owner's thread (for `http1.Connection`, the daemon's
event loop) and never blocks; its callbacks must not block either.
"""

from __future__ import annotations

import re
from typing import Protocol

import httptools

from tsctl.errors import BadRequest

#: the largest request head (request line plus headers) read before answering 431
MAX_HEAD = 64 * 1024
#: bytes handed to llhttp at once (a longer `feed` is cut into pieces of this size)
PIECE = 16 * 1024
_DIGITS = re.compile(r"[0-9]+")  # `str.isdigit` also takes "²"
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


class HeadTooLarge(BadRequest):
    """A request head over `MAX_HEAD`."""

    http_status = 431


class UnsupportedTransferCoding(BadRequest):
    """A transfer coding other than chunked."""

    http_status = 501


class RequestHead:
    """A parsed request line and its headers (names as sent; `get` is case-insensitive, and
    `fields` maps each lower-cased name to its value, repeated ones joined with commas)."""

    __slots__ = ("fields", "headers", "keep_alive", "method", "path", "target", "version")

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
        self.fields = index
        connection = index.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name.lower(), default)

    def body_length(self) -> int | None:
        """How the body is framed: its `Content-Length` (0: no body), or None when chunked.
        `BadRequest` for a malformed or ambiguous length, `UnsupportedTransferCoding` for a
        coding other than chunked. (llhttp refuses most of these first; this is the rule for
        heads made otherwise.)"""
        coding = self.fields.get("transfer-encoding", "").lower()
        if "content-length" in self.fields:
            declared = self.fields["content-length"].strip()
            if coding:
                raise BadRequest("both Content-Length and Transfer-Encoding were sent")
            if not _DIGITS.fullmatch(declared):
                raise BadRequest(f"malformed Content-Length {declared[:40]!r}")
            return int(declared)
        if not coding:
            return 0
        if coding != "chunked":
            raise UnsupportedTransferCoding(f"unsupported Transfer-Encoding {coding[:40]!r}")
        return None


class ParserOwner(Protocol):
    """What a `RequestParser` calls back (synchronously, from `feed`)."""

    def on_begin(self) -> None:
        """The first byte of a request head."""

    def on_head(self, head: RequestHead) -> None:
        """A request head; its body (if any) follows."""

    def on_body(self, chunk: bytes) -> None:
        """A piece of the body (a copy)."""

    def on_complete(self) -> None:
        """The body is in (or there was none)."""


class _Stop(Exception):
    """Raised by `RequestParser.close` from inside a callback: stop at once."""


class RequestParser:
    """The framing state of one connection's requests (see the module docstring)."""

    __slots__ = (
        "_headers",
        "_llhttp",
        "_piece",
        "_stored",
        "_url",
        "closed",
        "fed_in_head",
        "finished",
        "in_head",
        "owner",
    )

    def __init__(self, owner: ParserOwner) -> None:
        self.owner = owner
        self._llhttp = httptools.HttpRequestParser(self)
        # RFC 9112 allows whitespace before a chunk extension's ';'
        self._llhttp.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._stored = 0  # bytes of the current head kept so far
        self._piece = 0  # the length of the piece being parsed
        #: a head has begun and is not complete
        self.in_head = False
        #: bytes fed after the piece in which the current head began (an upper bound on the
        #: part of the head llhttp holds without reporting it)
        self.fed_in_head = -1
        #: a request that ends the connection is complete: the rest is ignored
        self.finished = False
        self.closed = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse `data` (see the module docstring for what comes out)."""
        if len(data) <= PIECE:
            self._feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), PIECE):
            self._feed(view[start : start + PIECE])

    def _feed(self, piece: bytes | bytearray | memoryview) -> None:
        """Parse one piece of at most `PIECE` bytes."""
        if not self.closed and not self.finished:
            self._piece = len(piece)
            try:
                self._llhttp.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self.finished = True  # an upgrade (or CONNECT) request: nothing follows
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, _Stop) or self.finished:
                    return
                raise cause if cause is not None else BadRequest(str(exc)) from None
            except httptools.HttpParserError as exc:
                if self.finished:  # bytes after a last request: ignored
                    return
                raise BadRequest(f"malformed HTTP request: {exc}") from None
            if self.in_head:
                self.fed_in_head += self._piece
                if self.fed_in_head > MAX_HEAD:
                    raise HeadTooLarge("the request head is over 64 KiB")

    def close(self) -> None:
        """Stop for good: nothing more is parsed or reported (callbacks may call it)."""
        self.closed = True

    def idle(self) -> bool:
        """Between requests, with nothing of the next head received."""
        return not self.in_head and not self.closed

    # --- llhttp's callbacks (through httptools)

    def on_message_begin(self) -> None:
        if self.closed or self.finished:
            raise _Stop
        self._url = []
        self._headers = []
        self._stored = 0
        self.in_head = True
        self.fed_in_head = -self._piece  # the piece it began in does not count (`feed`)
        self.owner.on_begin()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._stored += len(url)
        if self._stored > MAX_HEAD:
            raise HeadTooLarge("the request head is over 64 KiB")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._stored += len(name) + len(value) + 4
        if self._stored > MAX_HEAD:
            raise HeadTooLarge("the request head is over 64 KiB")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        self.in_head = False
        llhttp = self._llhttp
        version = _VERSIONS.get(llhttp.get_http_version())
        if version is None:
            raise BadRequest(
                f"unsupported HTTP version {llhttp.get_http_version()} in the request line"
            )
        target = b"".join(self._url).decode("ascii")  # llhttp refuses anything else
        head = RequestHead(llhttp.get_method().decode("ascii"), target, version, self._headers)
        if llhttp.should_upgrade():
            head.keep_alive = False  # an upgrade tsctl will not make: close after answering
        if "transfer-encoding" in head.fields:
            head.body_length()  # 501 for codings llhttp lets through ("gzip, chunked")
        self.owner.on_head(head)
        if self.closed:
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self.owner.on_body(body)
        if self.closed:
            raise _Stop

    def on_message_complete(self) -> None:
        if not self._llhttp.should_keep_alive():
            self.finished = True
        self.owner.on_complete()
        if self.closed:
            raise _Stop
