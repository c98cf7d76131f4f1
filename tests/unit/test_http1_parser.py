"""The inference port's HTTP/1.1 request parser on its own (`tsctl.server.api.http1.parser`,
llhttp through httptools): bytes in, heads, body pieces and errors out, with no socket and no
event loop. Holding pipelined requests back is the connection's business
(tests/unit/test_http1_connection.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tsctl.errors import BadRequest
from tsctl.server.api.http1.parser import (
    MAX_HEAD,
    PIECE,
    HeadTooLarge,
    RequestHead,
    RequestParser,
    UnsupportedTransferCoding,
)


class Owner:
    """Records what the parser reports."""

    def __init__(self) -> None:
        self.parser = RequestParser(self)
        self.heads: list[RequestHead] = []
        self.bodies: list[bytearray] = []
        self.pieces: list[bytes] = []
        self.begun = 0
        self.completed = 0

    def on_begin(self) -> None:
        self.begun += 1

    def on_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.bodies.append(bytearray())

    def on_body(self, chunk: bytes) -> None:
        assert type(chunk) is bytes
        self.pieces.append(chunk)
        self.bodies[-1] += chunk

    def on_complete(self) -> None:
        self.completed += 1

    def feed(self, data: bytes) -> Owner:
        self.parser.feed(data)
        return self

    def trickle(self, data: bytes) -> Owner:
        for i in range(len(data)):
            self.feed(data[i : i + 1])
        return self

    def summary(self) -> list[tuple[str, str, bytes]]:
        return [
            (h.method, h.target, bytes(b)) for h, b in zip(self.heads, self.bodies, strict=True)
        ]


def request(
    method: str = "POST",
    target: str = "/predictions/m",
    body: bytes = b"",
    *headers: str,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: x", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces: bytes, trailers: bytes = b"", ext: bytes = b"") -> bytes:
    head = b"POST /predictions/m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in pieces)
    return head + body + b"0\r\n" + trailers + b"\r\n"


# --- heads


def test_request_line_and_headers() -> None:
    owner = Owner().feed(
        b"GET /predictions/m/1.0?x=1&y=2 HTTP/1.1\r\nHost: x\r\nX-Request-Id:  abc  \r\n"
        b"Accept: a\r\nACCEPT: b\r\nEmpty:\r\n\r\n"
    )
    [head] = owner.heads
    assert (head.method, head.target, head.path, head.version) == (
        "GET",
        "/predictions/m/1.0?x=1&y=2",
        "/predictions/m/1.0",
        "HTTP/1.1",
    )
    assert head.headers == [
        ("Host", "x"),
        ("X-Request-Id", "abc"),
        ("Accept", "a"),
        ("ACCEPT", "b"),
        ("Empty", ""),
    ]
    assert head.get("x-request-id") == "abc" and head.get("X-REQUEST-ID") == "abc"
    assert head.get("accept") == "a,b"  # repeated headers, joined as HTTP allows
    assert head.get("missing") == "" and head.get("missing", "d") == "d"
    assert owner.completed == 1 and owner.bodies == [b""]


def test_header_values_are_latin_1() -> None:
    owner = Owner().feed(b"GET /caf%C3%A9 HTTP/1.1\r\nX-Name: na\xefve\r\n\r\n")
    assert owner.heads[0].target == "/caf%C3%A9" and owner.heads[0].get("x-name") == "na\xefve"


def test_trailing_whitespace_in_a_value_is_dropped() -> None:
    owner = Owner().feed(b"POST / HTTP/1.1\r\nContent-Length: 3 \t\r\nX-A:\t a \r\n\r\nabc")
    assert owner.heads[0].get("x-a") == "a" and owner.bodies == [b"abc"]


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Close", False),
        ("HTTP/1.1", "Upgrade, close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "close", False),
        ("HTTP/1.0", "keep-alive", True),
        ("HTTP/1.0", "Keep-Alive", True),
    ],
)
def test_keep_alive_rules(version: str, connection: str | None, keep_alive: bool) -> None:
    headers = [f"Connection: {connection}"] if connection else []
    owner = Owner().feed(request("GET", "/ping", b"", *headers, version=version))
    assert owner.heads[0].keep_alive is keep_alive


def test_blank_lines_between_requests_are_tolerated() -> None:
    owner = Owner().feed(b"\r\n\r\n" + request("GET", "/a"))
    owner.feed(b"\r\n").feed(b"\r\n").feed(request("GET", "/b"))
    assert [h.target for h in owner.heads] == ["/a", "/b"]


def test_a_blank_line_before_a_pipelined_request() -> None:
    owner = Owner().feed(request("GET", "/a") + b"\r\n" + request("GET", "/b"))
    assert [h.target for h in owner.heads] == ["/a", "/b"]


# --- bodies


def test_content_length_body() -> None:
    body = bytes(range(256)) * 10
    owner = Owner().feed(request("POST", "/p", body))
    assert owner.summary() == [("POST", "/p", body)]
    assert owner.completed == 1 and owner.parser.idle()


def test_a_body_arrives_in_the_pieces_it_was_received_in() -> None:
    data = request("POST", "/p", b"0123456789")
    owner = Owner().feed(data[:-6])
    assert owner.pieces == [b"0123"] and owner.completed == 0
    owner.feed(data[-6:-3]).feed(data[-3:] + b"GET")  # the next request's first bytes
    assert owner.pieces == [b"0123", b"456", b"789"] and owner.completed == 1
    assert owner.begun == 2 and not owner.parser.idle()  # a head has begun


def test_a_long_feed_is_parsed_a_piece_at_a_time() -> None:
    body = bytes(range(256)) * (3 * PIECE // 256)
    owner = Owner().feed(request("POST", "/p", body))
    assert owner.bodies == [body] and all(len(p) <= PIECE for p in owner.pieces)


def test_body_length_is_the_framing() -> None:
    def length(*headers: tuple[str, str]) -> int | None:
        return RequestHead("POST", "/", "HTTP/1.1", list(headers)).body_length()

    assert length() == 0
    assert length(("Content-Length", "0")) == 0
    assert length(("Content-Length", " 12 ")) == 12
    assert length(("Content-Length", "12345678901234567890")) == 12345678901234567890
    assert length(("Transfer-Encoding", "chunked")) is None
    assert length(("Transfer-Encoding", "Chunked")) is None
    with pytest.raises(BadRequest, match="malformed Content-Length '3, 3'"):
        length(("Content-Length", "3, 3"))  # llhttp refuses duplicates first: so does this
    with pytest.raises(BadRequest, match="both Content-Length and Transfer-Encoding"):
        length(("Content-Length", ""), ("Transfer-Encoding", "chunked"))
    with pytest.raises(UnsupportedTransferCoding, match="'gzip, chunked'"):
        length(("Transfer-Encoding", "gzip, chunked"))


def test_chunked_body_with_extensions_and_trailers() -> None:
    pieces = [b"{", b"a" * 300, b"}"]
    data = chunked(*pieces, trailers=b"X-Checksum: 1\r\nX-Other: 2\r\n", ext=b";name=value")
    owner = Owner().feed(data)
    assert owner.summary() == [("POST", "/predictions/m", b"".join(pieces))]
    assert owner.pieces == pieces
    assert owner.heads[0].get("x-checksum") == ""  # trailers are read and dropped
    assert owner.completed == 1 and owner.parser.idle()


def test_chunk_sizes_in_either_case_with_spaces_before_the_extension() -> None:
    body = b"x" * 0xAB + b"y" * 0xCD
    data = (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"ab \t;e=1\r\n"
        + b"x" * 0xAB
        + b"\r\n0000Cd\r\n"
        + b"y" * 0xCD
        + b"\r\n0\r\n\r\n"
    )
    assert Owner().feed(data).bodies == [body]


def test_a_chunked_body_with_no_chunks() -> None:
    owner = Owner().feed(chunked())
    assert owner.bodies == [b""] and owner.completed == 1


# --- several requests, and how they are fed


def pipeline() -> bytes:
    return (
        request("POST", "/a", b"first")
        + chunked(b"sec", b"ond", ext=b";x")
        + request("GET", "/c")
        + request("POST", "/d", b"fourth", "Connection: close")
    )


EXPECTED = [
    ("POST", "/a", b"first"),
    ("POST", "/predictions/m", b"second"),
    ("GET", "/c", b""),
    ("POST", "/d", b"fourth"),
]


def test_pipelined_requests_in_one_buffer() -> None:
    owner = Owner().feed(pipeline())
    assert owner.summary() == EXPECTED
    assert owner.completed == 4 and owner.parser.idle()


def test_requests_fed_byte_by_byte() -> None:
    owner = Owner().trickle(pipeline())
    assert owner.summary() == EXPECTED
    assert all(len(piece) == 1 for piece in owner.pieces)


@pytest.mark.parametrize("size", [2, 3, 7, 64])
def test_requests_fed_in_pieces_of_any_size(size: int) -> None:
    data = pipeline()
    owner = Owner()
    for i in range(0, len(data), size):
        owner.feed(data[i : i + size])
    assert owner.summary() == EXPECTED


def test_a_closed_parser_consumes_nothing() -> None:
    owner = Owner()
    owner.parser.close()
    owner.feed(request("GET", "/a"))
    assert owner.heads == [] and owner.begun == 0 and not owner.parser.idle()


@pytest.mark.parametrize("callback", ["on_head", "on_body", "on_complete"])
def test_the_owner_may_close_from_a_callback(callback: str) -> None:
    class Closing(Owner):
        def on_head(self, head: RequestHead) -> None:
            super().on_head(head)
            if callback == "on_head":
                self.parser.close()

        def on_body(self, chunk: bytes) -> None:
            super().on_body(chunk)
            if callback == "on_body":
                self.parser.close()

        def on_complete(self) -> None:
            super().on_complete()
            if callback == "on_complete":
                self.parser.close()

    owner = Closing().feed(request("POST", "/a", b"xy") + request("GET", "/b"))
    assert [h.target for h in owner.heads] == ["/a"] and owner.parser.closed
    owner.feed(request("GET", "/c"))
    assert len(owner.heads) == 1


def test_an_owner_error_comes_out_of_feed_as_it_was_raised() -> None:
    class Failing(Owner):
        def on_head(self, head: RequestHead) -> None:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        Failing().feed(request("GET", "/a"))


def test_idle_only_between_requests_with_nothing_received() -> None:
    owner = Owner()
    assert owner.parser.idle()
    owner.feed(b"GET /a HT")
    assert not owner.parser.idle()
    owner.feed(b"TP/1.1\r\n\r\n")
    assert owner.parser.idle()


@pytest.mark.parametrize(
    "last",
    [
        request("GET", "/a", b"", "Connection: close"),
        request("GET", "/a", version="HTTP/1.0"),
        request("GET", "/a", b"", "Connection: Upgrade", "Upgrade: websocket"),
    ],
    ids=["Connection: close", "HTTP/1.0", "upgrade"],
)
def test_what_follows_a_last_request_is_ignored(last: bytes) -> None:
    owner = Owner().feed(last + b"GET /b HTTP/1.1\r\n\r\n\x00garbage")
    assert [h.target for h in owner.heads] == ["/a"] and owner.completed == 1
    assert not owner.heads[0].keep_alive
    owner.feed(b"more garbage")
    assert len(owner.heads) == 1


# --- what the layer refuses

BIG = b"a" * (MAX_HEAD + 10)
CHUNKED_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
GET = b"GET / HTTP/1.1\r\n"
POST = b"POST / HTTP/1.1\r\n"


def refused(case: str, data: bytes, needle: str, error: type[BadRequest] = BadRequest) -> Any:
    return pytest.param(data, error, needle, id=case)


REFUSED = [
    refused(
        "no version (HTTP/0.9)", b"POST /p\r\nHost: x\r\n\r\n", "version 0.9 in the request line"
    ),
    refused("HTTP/2", b"GET / HTTP/2.0\r\n\r\n", "version 2.0 in the request line"),
    refused("HTTP/1.2", b"GET / HTTP/1.2\r\n\r\n", "Invalid HTTP version"),
    refused("not HTTP", b"GET / FTP/1.1\r\n\r\n", "Expected HTTP/"),
    refused("bad method", b"G(T / HTTP/1.1\r\n\r\n", "Invalid method"),
    refused("empty target", b"GET  HTTP/1.1\r\n\r\n", "url"),
    refused("extra space", b"GET / x HTTP/1.1\r\n\r\n", "Expected HTTP/"),
    refused("no colon", GET + b"no colon here\r\n\r\n", "Invalid header token"),
    refused("space in name", GET + b"Bad Name: v\r\n\r\n", "Invalid header token"),
    refused("empty name", GET + b": v\r\n\r\n", "Invalid header token"),
    refused("continuation first", GET + b" continued\r\n\r\n", "Unexpected space"),
    refused("obsolete folding", GET + b"X-Long: one\r\n two\r\n\r\n", "whitespace"),
    # the target goes into access_log.log: nothing in it may forge a line or a field
    refused("control byte in the target", b"GET /a\x01b HTTP/1.1\r\n\r\n", "url"),
    refused("escape in the target", b"GET /a\x1b[31mb HTTP/1.1\r\n\r\n", "url"),
    refused("DEL in the target", b"GET /a\x7fb HTTP/1.1\r\n\r\n", "url"),
    refused("tab in the target", b"GET /a\tb HTTP/1.1\r\n\r\n", "url"),
    refused("non-ASCII target", b"GET /caf\xe9 HTTP/1.1\r\n\r\n", "url"),
    refused("bare LF in the target line", b"GET /a\nX: 1 HTTP/1.1\r\n\r\n", "request line"),
    refused("bare LF in a value", GET + b"X: a\nb: c\r\n\r\n", "Missing expected CR"),
    refused("bare LF ending the head", b"GET / HTTP/1.1\nX: a\n\n", "CRLF"),
    refused("bare CR in a value", GET + b"X: a\rb\r\n\r\n", "LF after header value"),
    refused("NUL in a value", GET + b"X: a\x00b\r\n\r\n", "Invalid header value char"),
    refused("control byte in a value", GET + b"X: a\x01b\r\n\r\n", "Invalid header value char"),
    refused("Content-Length not a number", POST + b"Content-Length: ten\r\n\r\n", "Content-Length"),
    refused("superscript Content-Length", POST + b"Content-Length: \xb2\r\n\r\n", "Content-Length"),
    refused(
        "UTF-8 superscript Content-Length",
        POST + "Content-Length: 1\u00b9".encode() + b"\r\n\r\n",
        "Content-Length",
    ),
    refused(
        "two Content-Lengths",
        POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "Duplicate Content-Length",
    ),
    refused(
        "the same Content-Length twice",  # RFC 9110 allows refusing; Netty (TorchServe) does
        POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        "Duplicate Content-Length",
    ),
    refused("a Content-Length list", POST + b"Content-Length: 1, 2\r\n\r\n", "Content-Length"),
    refused("negative Content-Length", POST + b"Content-Length: -1\r\n\r\n", "Content-Length"),
    refused("signed Content-Length", POST + b"Content-Length: +1\r\n\r\n", "Content-Length"),
    refused(
        "Content-Length over 64 bits",
        POST + b"Content-Length: 123456789012345678901\r\n\r\n",
        "Content-Length overflow",
    ),
    refused(
        "Content-Length and Transfer-Encoding",
        POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "can't be present with Content-Length",
    ),
    refused(
        "empty Content-Length beside chunked",
        POST + b"Content-Length: \r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Empty Content-Length",
    ),
    refused(
        "chunked, then Content-Length",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        "can't be present with Transfer-Encoding",
    ),
    refused(
        "chunked twice", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n", "Transfer-Encoding"
    ),
    refused(
        "chunked, then gzip",
        POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        "Transfer-Encoding",
    ),
    refused(
        "gzip alone", POST + b"Transfer-Encoding: gzip\r\n\r\n", "'gzip'", UnsupportedTransferCoding
    ),
    refused(
        "gzip then chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        "'gzip, chunked'",
        UnsupportedTransferCoding,
    ),
    refused("bad chunk size", CHUNKED_HEAD + b"zz\r\n", "chunk size"),
    refused("negative chunk size", CHUNKED_HEAD + b"-1\r\n", "chunk size"),
    refused("no chunk size", CHUNKED_HEAD + b";ext\r\n", "chunk size"),
    refused("chunk size over 64 bits", CHUNKED_HEAD + b"1" * 17 + b"\r\n", "Chunk size overflow"),
    refused("chunk not followed by CRLF", CHUNKED_HEAD + b"2\r\nabcd", "after chunk data"),
    refused("bare LF after a chunk size", CHUNKED_HEAD + b"2\nab\r\n0\r\n\r\n", "chunk"),
    refused("head over 64 KiB", GET + b"X-Big: " + BIG * 2, "over 64 KiB", HeadTooLarge),
    refused(
        "complete head over 64 KiB",
        GET + b"X-Big: " + BIG + b"\r\n\r\n",
        "over 64 KiB",
        HeadTooLarge,
    ),
    refused(
        "target over 64 KiB", b"GET /" + BIG + b" HTTP/1.1\r\n\r\n", "over 64 KiB", HeadTooLarge
    ),
    refused(
        "many headers over 64 KiB",
        GET + b"X: y\r\n" * (MAX_HEAD // 5) + b"\r\n",
        "over 64 KiB",
        HeadTooLarge,
    ),
]


@pytest.mark.parametrize(("data", "error", "needle"), REFUSED)
@pytest.mark.parametrize("feed", ["whole", "in pieces"])
def test_malformed_requests_are_refused(
    data: bytes, error: type[BadRequest], needle: str, feed: str
) -> None:
    owner = Owner()
    # byte by byte for the small ones; a 64 KiB head one byte at a time takes seconds here
    step = len(data) if feed == "whole" else 1 if len(data) < 1024 else 997
    with pytest.raises(error) as caught:
        for i in range(0, len(data), step):
            owner.feed(data[i : i + step])
    assert type(caught.value) is error
    assert caught.value.http_status == {BadRequest: 400, HeadTooLarge: 431}.get(error, 501)
    assert needle in caught.value.message, caught.value.message
    assert owner.completed == 0


def test_a_bad_request_after_a_good_one_is_refused_on_its_own() -> None:
    owner = Owner()
    with pytest.raises(BadRequest, match="Invalid method"):
        owner.feed(request("POST", "/a", b"ok") + b"BROKEN\r\n\r\n")
    assert owner.summary() == [("POST", "/a", b"ok")]


def test_a_head_of_exactly_max_head_is_read() -> None:
    filler = MAX_HEAD - len(b"GET / HTTP/1.1\r\nX-Big: ")
    owner = Owner().feed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * filler + b"\r\n\r\n")
    assert len(owner.heads[0].get("x-big")) == filler


def test_an_endless_header_value_is_refused_in_bounded_memory() -> None:
    owner = Owner().feed(GET + b"X-Endless: ")
    with pytest.raises(HeadTooLarge):
        for _ in range(MAX_HEAD // 1000 + 2):  # llhttp keeps an unfinished value unreported
            owner.feed(b"a" * 1000)


@pytest.mark.parametrize("value", ["\xb2", "1\xb9", "\u0663", "\uff11"])
def test_a_content_length_of_non_ascii_digits(value: str) -> None:
    with pytest.raises(BadRequest, match="Content-Length"):
        RequestHead("POST", "/", "HTTP/1.1", [("Content-Length", value)]).body_length()
