"""Fuzzing the parsing of form bodies on the inference port: `PredictionExchange._parts` (in
`tsctl.server.api.rest_inference`), which hands multipart/form-data and urlencoded bodies to
tornado's `parse_body_arguments`. Whatever the Content-Type and body, it returns parts or
raises `BadRequest` (a 400), and logs no error.

Inputs: multipart bodies built from a grammar (boundaries quoted or not, dispositions with
odd names, control bytes and non-UTF-8 in headers, missing or repeated boundaries, parts
without headers) with bytes mutated; urlencoded bodies; random bytes under each type.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support import fuzzing
from tsctl.errors import BadRequest
from tsctl.ipc.messages import Part
from tsctl.server.api.http1.parser import RequestHead
from tsctl.server.api.rest_inference import PredictionExchange

pytest_generate_tests = fuzzing.pytest_generate_tests


def parse(content_type: str, body: bytes) -> list[Part] | None:
    exchange: Any = SimpleNamespace(
        head=RequestHead("POST", "/predictions/m", "HTTP/1.1", [("Content-Type", content_type)])
    )
    try:
        parts: list[Part] = PredictionExchange._parts(exchange, body)
    except BadRequest:
        return None
    assert all(isinstance(p.data, bytes | bytearray) for p in parts)
    return parts


BOUNDARIES = st.sampled_from(["b", "----x", "a b", "é", '"q"', "", "-", "b" * 80]) | st.text(
    max_size=12
)
NAMES = st.sampled_from(['"data"', "data", '"a\\"b"', '"\x00\x01\x7f"', '""', '"é"', "a;b"])
HEADER_LINES = st.sampled_from(
    [
        b"Content-Disposition: form-data; name=%s",
        b'Content-Disposition: form-data; name=%s; filename="f.bin"',
        b"Content-Disposition: attachment; name=%s",
        b"Content-Disposition: form-data",
        b"Content-Type: application/json",
        b"Content-Type: \xff\xfe",
        b"X-\x00: \x01",
        b" folded",
        b"no colon",
        b"",
    ]
)


@st.composite
def multipart(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(BOUNDARIES)
    quoted = draw(st.booleans())
    shown = f'"{boundary}"' if quoted else boundary
    content_type = "multipart/form-data; boundary=" + shown
    if draw(st.booleans()):
        content_type = draw(st.sampled_from(["multipart/form-data", "MULTIPART/FORM-DATA;"]))
    sep = b"--" + boundary.encode("utf-8", "surrogatepass")
    chunks = []
    for _ in range(draw(st.integers(0, 4))):
        lines = []
        for _ in range(draw(st.integers(0, 3))):
            line = draw(HEADER_LINES)
            if b"%s" in line:
                line = line % draw(NAMES).encode("utf-8", "surrogatepass")
            lines.append(line)
        eol = draw(st.sampled_from([b"\r\n", b"\n"]))
        body = draw(st.binary(max_size=32) | st.sampled_from([b"{}", b"[" * 50, b"--" + sep]))
        chunks.append(sep + eol + eol.join(lines) + eol + eol + body + eol)
    ending = draw(st.sampled_from([sep + b"--\r\n", sep + b"--", b"", sep, b"--\r\n"]))
    data = bytearray(b"".join(chunks) + ending)
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return content_type, bytes(data)


CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=b; boundary=c",
        "multipart/form-data;boundary=\x00",
        "multipart/form-data; boundary=\u2028",
        "application/json",
        "",
    ]
)
URLENCODED = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=6).map(
    lambda kv: "&".join(f"{k}={v}" for k, v in kv).encode("utf-8", "surrogatepass")
)


def test_multipart_bodies(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(multipart())
    def check(case: tuple[str, bytes]) -> None:
        parse(*case)

    check()


def test_any_body_under_any_form_type(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(CONTENT_TYPES | st.text(max_size=40), st.binary(max_size=200) | URLENCODED)
    def check(content_type: str, body: bytes) -> None:
        parse(content_type, body)

    check()


def test_a_well_formed_multipart_body_gives_its_parts() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="data"; filename="x"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--b\r\n"
        b'Content-Disposition: form-data; name="k"\r\n\r\nv\r\n--b--\r\n'
    )
    parts = parse("multipart/form-data; boundary=b", body)
    assert parts is not None
    assert {(p.name, p.content_type, bytes(p.data)) for p in parts} == {
        ("data", "image/png", b"\x89PNG"),
        ("k", "", b"v"),
    }
