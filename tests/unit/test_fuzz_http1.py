"""Fuzzing the inference port's HTTP/1.1 request parser (`tsctl.server.api.http1.parser`):
whatever bytes a client sends, in whatever pieces, `RequestParser.feed` (with the owner
asking each head for its `body_length()`, as `http1.Connection` does) delivers requests or
raises `BadRequest` (431 and 501 are kinds of it), and nothing else; and how the bytes are cut
into pieces changes nothing: the same requests, heads and bodies, or the same refusal.

Inputs: requests built from a grammar (methods, targets with odd bytes, header lines with
framing conflicts, chunked bodies with extensions and trailers), several in a row (pipelined),
with bytes mutated; and random bytes.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support import fuzzing
from tsctl.errors import BadRequest
from tsctl.server.api.http1.parser import RequestHead, RequestParser

pytest_generate_tests = fuzzing.pytest_generate_tests


class Recorder:
    """A parser owner that records what it is told; it reads each body as the connection
    does (`head.body_length()`)."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.bodies: list[bytearray] = []

    def on_begin(self) -> None:
        self.events.append("begin")

    def on_head(self, head: RequestHead) -> None:
        head.body_length()
        self.events.append(("head", head.method, head.target, head.version, list(head.headers)))
        self.bodies.append(bytearray())

    def on_body(self, chunk: bytes) -> None:
        self.bodies[-1] += chunk

    def on_complete(self) -> None:
        self.events.append(("complete", bytes(self.bodies[-1])))


def run(data: bytes, cuts: list[int]) -> tuple[list[Any], str | None]:
    """Feed `data` cut at `cuts`; the events, and the refusal's class if any."""
    owner = Recorder()
    parser = RequestParser(owner)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    try:
        for start, end in itertools.pairwise(bounds):
            parser.feed(data[start:end])
    except BadRequest as exc:
        return owner.events, type(exc).__name__
    return owner.events, None


METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "G\x00T", "get"])
TARGETS = st.sampled_from(
    ["/ping", "/predictions/m", "/predictions/m?x=1", "*", "http://h/p", "/a b", "/\x7f", "/é",
     "/%00", "//", ""]
)  # fmt: skip
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""])
HEADERS = st.sampled_from(
    ["Host: x", "Content-Length: 5", "Content-Length: 0", "Content-Length: ",
     "Content-Length: 5, 5", "Content-Length: -1", "Content-Length: 99999999999999999999",
     "Content-Length: \u00b2", "Transfer-Encoding: chunked", "Transfer-Encoding: gzip, chunked",
     "Transfer-Encoding: identity", "Transfer-Encoding: chunked, chunked", "Connection: close",
     "Connection: keep-alive",
     "Connection: upgrade", "Upgrade: websocket", "Expect: 100-continue", " folded", "X-A:\tb",
     "X-Nul: a\x00b", "X-Ctl: \x01", "X-Hi: \xff", "No-Colon", ": empty-name", "X A: b"]
)  # fmt: skip
EOLS = st.sampled_from(["\r\n", "\n", "\r"])
BODIES = st.sampled_from(
    ["", "hello", "5\r\nhello\r\n0\r\n\r\n", "5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
     "ffffffffffffffffff\r\n", "0\r\n\r\n", "zz\r\n", "3\r\nab\r\n"]
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        eol = draw(st.sampled_from(["\r\n"] * 4) | EOLS)
        head = [f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"]
        head += draw(st.lists(HEADERS, max_size=5))
        out.append(eol.join(head) + eol + eol + draw(BODIES))
    data = bytearray("".join(out).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.sampled_from([0, 10, 13, 32, 58, 0x7F, 0xFF]) | st.integers(0, 255))
    return bytes(data)


CUTS = st.lists(st.integers(0, 10_000), max_size=6)


def test_requests_in_any_pieces(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(requests(), CUTS)
    def check(data: bytes, cuts: list[int]) -> None:
        whole = run(data, [])
        assert run(data, cuts) == whole

    check()


def test_random_bytes(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(st.binary(max_size=300), CUTS)
    def check(data: bytes, cuts: list[int]) -> None:
        assert run(data, cuts) == run(data, [])

    check()


def test_an_endless_head_is_refused() -> None:
    _, refusal = run(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 200_000, [1000, 70_000])
    assert refusal == "HeadTooLarge"
