"""The inference port's HTTP/1.1 request parser on its own (`tsctl.server.api.http1.parser`):
bytes in, heads, body pieces and errors out, with no socket and no event loop. The owner here
does what `http1.Connection` does with a request it answers at once: read the body the head
declares, then go on with the next request."""

from __future__ import annotations

from typing import Any

import pytest

from tsctl.errors import BadRequest
from tsctl.server.api.http1.parser import (
    BUSY,
    CLOSED,
    HEAD,
    MAX_CHUNK_LINE,
    MAX_HEAD,
    HeadTooLarge,
    RequestHead,
    RequestParser,
    UnsupportedTransferCoding,
)


class Owner:
    """Records what the parser reports; `answer` decides whether it moves on by itself."""

    def __init__(self, answer: bool = True) -> None:
        self.parser = RequestParser(self)
        self.answer = answer
        self.heads: list[RequestHead] = []
        self.bodies: list[bytearray] = []
        self.pieces: list[bytes] = []
        self.completed = 0

    def on_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.bodies.append(bytearray())
        self.parser.read_body(head.body_length())

    def on_body(self, chunk: bytes) -> None:
        assert type(chunk) is bytes
        self.pieces.append(chunk)
        self.bodies[-1] += chunk

    def on_complete(self) -> None:
        self.completed += 1
        if self.answer:
            assert self.parser.next_request()

    def feed(self, data: bytes) -> Owner:
        self.parser.buffer += data
        self.parser.parse()
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


def test_obsolete_header_folding_continues_the_last_value() -> None:
    owner = Owner().feed(b"GET / HTTP/1.1\r\nX-Long: one\r\n two\r\n\tthree\r\nHost: x\r\n\r\n")
    assert owner.heads[0].get("x-long") == "one two three"


def test_header_values_are_latin_1() -> None:
    owner = Owner().feed(b"GET /caf\xe9 HTTP/1.1\r\nX-Name: na\xefve\r\n\r\n")
    assert owner.heads[0].target == "/caf\xe9" and owner.heads[0].get("x-name") == "na\xefve"


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


@pytest.mark.xfail(
    raises=BadRequest,
    reason="one CRLF before a request is skipped only while no whole head is buffered behind "
    "it: pipelined together, the CRLF becomes an empty request line (400)",
)
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
    assert owner.parser.buffer == b"GET"  # left for the next head


def test_repeated_identical_content_length_is_one_length() -> None:
    data = b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc"
    assert Owner().feed(data).bodies == [b"abc"]
    assert RequestHead("POST", "/", "HTTP/1.1", [("Content-Length", "3, 3")]).body_length() == 3


def test_body_length_is_the_framing() -> None:
    def length(*headers: tuple[str, str]) -> int | None:
        return RequestHead("POST", "/", "HTTP/1.1", list(headers)).body_length()

    assert length() == 0
    assert length(("Content-Length", "0")) == 0
    assert length(("Content-Length", " 12 ")) == 12
    assert length(("Content-Length", "12345678901234567890")) == 12345678901234567890
    assert length(("Transfer-Encoding", "chunked")) is None
    assert length(("Transfer-Encoding", "Chunked")) is None


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


def test_one_request_at_a_time_until_the_owner_moves_on() -> None:
    owner = Owner(answer=False).feed(pipeline())
    assert owner.summary() == EXPECTED[:1] and owner.parser.state == BUSY
    pending = bytes(owner.parser.buffer)
    owner.feed(b"")  # nothing moves while the request is in progress
    assert len(owner.heads) == 1 and owner.parser.buffer == pending
    assert owner.parser.next_request() and owner.parser.state == HEAD
    assert not owner.parser.next_request()  # only a waiting parser moves on
    owner.parser.parse()
    assert owner.summary() == EXPECTED[:2]


def test_after_a_head_the_parser_waits_for_the_owner_to_read_the_body() -> None:
    class Refusing(Owner):
        def on_head(self, head: RequestHead) -> None:
            self.heads.append(head)  # answers (say, 413) without reading the body

    owner = Refusing().feed(request("POST", "/p", b"0123456789"))
    assert owner.parser.state == BUSY and owner.parser.buffer == b"0123456789"
    assert owner.pieces == [] and owner.completed == 0


def test_a_closed_parser_consumes_nothing() -> None:
    owner = Owner()
    owner.parser.close()
    owner.feed(request("GET", "/a"))
    assert owner.heads == [] and owner.parser.state == CLOSED
    assert not owner.parser.next_request() and not owner.parser.idle()


def test_the_owner_may_close_from_a_callback() -> None:
    class Closing(Owner):
        def on_complete(self) -> None:
            self.completed += 1
            self.parser.close()

    owner = Closing().feed(request("GET", "/a") + request("GET", "/b"))
    assert [h.target for h in owner.heads] == ["/a"] and owner.parser.state == CLOSED


def test_idle_only_between_requests_with_nothing_received() -> None:
    owner = Owner()
    assert owner.parser.idle()
    owner.feed(b"GET /a HT")
    assert not owner.parser.idle()
    owner.feed(b"TP/1.1\r\n\r\n")
    assert owner.parser.idle()


# --- what the layer refuses

BIG = b"a" * (MAX_HEAD + 10)
CHUNKED_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"

REFUSED: list[tuple[str, bytes, type[BadRequest], int, str]] = [
    ("no version", b"POST /p\r\nHost: x\r\n\r\n", BadRequest, 400, "request line b'POST /p'"),
    ("HTTP/2", b"GET / HTTP/2.0\r\n\r\n", BadRequest, 400, "request line b'GET / HTTP/2.0'"),
    ("not HTTP", b"GET / FTP/1.1\r\n\r\n", BadRequest, 400, "request line"),
    ("bad method", b"G(T / HTTP/1.1\r\n\r\n", BadRequest, 400, "request line b'G(T / HTTP/1.1'"),
    ("empty target", b"GET  HTTP/1.1\r\n\r\n", BadRequest, 400, "request line"),
    ("extra space", b"GET / x HTTP/1.1\r\n\r\n", BadRequest, 400, "request line"),
    ("no colon", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", BadRequest, 400, "no colon here"),
    ("space in name", b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", BadRequest, 400, "Bad Name"),
    ("empty name", b"GET / HTTP/1.1\r\n: v\r\n\r\n", BadRequest, 400, "header line b': v'"),
    (
        "continuation first",
        b"GET / HTTP/1.1\r\n continued\r\n\r\n",
        BadRequest,
        400,
        "continuation line comes first",
    ),
    (
        "Content-Length not a number",
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        BadRequest,
        400,
        "malformed Content-Length 'ten'",
    ),
    (
        "two Content-Lengths",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        BadRequest,
        400,
        "malformed Content-Length '1,2'",
    ),
    (
        "a Content-Length list",
        b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        BadRequest,
        400,
        "malformed Content-Length '1, 2'",
    ),
    (
        "negative Content-Length",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        BadRequest,
        400,
        "'-1'",
    ),
    (
        "signed Content-Length",
        b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        BadRequest,
        400,
        "'+1'",
    ),
    (
        "Content-Length and Transfer-Encoding",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        BadRequest,
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    (
        "gzip",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        UnsupportedTransferCoding,
        501,
        "unsupported Transfer-Encoding 'gzip'",
    ),
    (
        "gzip then chunked",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        UnsupportedTransferCoding,
        501,
        "'gzip, chunked'",
    ),
    ("bad chunk size", CHUNKED_HEAD + b"zz\r\n", BadRequest, 400, "bad chunk size b'zz'"),
    ("negative chunk size", CHUNKED_HEAD + b"-1\r\n", BadRequest, 400, "bad chunk size b'-1'"),
    ("no chunk size", CHUNKED_HEAD + b";ext\r\n", BadRequest, 400, "bad chunk size b';ext'"),
    (
        "chunk size over 16 digits",
        CHUNKED_HEAD + b"1" * 17 + b"\r\n",
        BadRequest,
        400,
        "bad chunk size b'11111",
    ),
    (
        "chunk size line too long",
        CHUNKED_HEAD + b"1;" + b"e" * MAX_CHUNK_LINE,
        BadRequest,
        400,
        "chunk size line too long",
    ),
    (
        "chunk not followed by CRLF",
        CHUNKED_HEAD + b"2\r\nabcd",
        BadRequest,
        400,
        "chunk followed by b'cd', not CRLF",
    ),
    ("head over 64 KiB", b"GET / HTTP/1.1\r\nX-Big: " + BIG, HeadTooLarge, 431, "over 64 KiB"),
    (
        "complete head over 64 KiB",
        b"GET / HTTP/1.1\r\nX-Big: " + BIG + b"\r\n\r\n",
        HeadTooLarge,
        431,
        "request head is over 64 KiB",
    ),
    (
        "trailers over 64 KiB",
        CHUNKED_HEAD + b"0\r\nX-Big: " + BIG,
        HeadTooLarge,
        431,
        "request trailers are over 64 KiB",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "error", "status", "needle"), REFUSED, ids=[r[0] for r in REFUSED]
)
@pytest.mark.parametrize("feed", ["whole", "in pieces"])
def test_malformed_requests_are_refused(
    case: str, data: bytes, error: type[BadRequest], status: int, needle: str, feed: str
) -> None:
    owner = Owner()
    # byte by byte for the small ones; a 64 KiB head one byte at a time takes seconds here
    step = len(data) if feed == "whole" else 1 if len(data) < 1024 else 997
    with pytest.raises(error) as caught:
        for i in range(0, len(data), step):
            owner.feed(data[i : i + step])
    assert type(caught.value) is error and caught.value.http_status == status
    assert needle in caught.value.message, caught.value.message


def test_a_bad_request_after_a_good_one_is_refused_on_its_own() -> None:
    owner = Owner()
    with pytest.raises(BadRequest, match="request line"):
        owner.feed(request("POST", "/a", b"ok") + b"BROKEN\r\n\r\n")
    assert owner.summary() == [("POST", "/a", b"ok")]


def test_a_head_of_exactly_max_head_is_read() -> None:
    filler = MAX_HEAD - len(b"GET / HTTP/1.1\r\nX-Big: ")
    owner = Owner().feed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * filler + b"\r\n\r\n")
    assert len(owner.heads[0].get("x-big")) == filler


@pytest.mark.xfail(
    raises=ValueError,
    reason="'\\xb2'.isdigit() is true but int() refuses it: the connection answers 500 and "
    "logs a traceback instead of a 400",
)
@pytest.mark.parametrize("value", ["\xb2", "1\xb9"])
def test_a_content_length_of_superscript_digits(value: Any) -> None:
    with pytest.raises(BadRequest, match="Content-Length"):
        RequestHead("POST", "/", "HTTP/1.1", [("Content-Length", value)]).body_length()
