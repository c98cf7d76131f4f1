"""Fuzzing the worker frame codec (`tsctl.ipc.codec`): whatever bytes arrive on a worker
socket, both readers answer a message, a `ProtocolError`, or their documented end-of-stream
error (`EOFError` for `recv_message`; `FrameReader.feed` returns no message until a frame
is whole).

Inputs: random bytes; valid frames of every kind with bytes flipped, cut or inserted; frames
whose prefix is right and whose JSON meta is arbitrary (any JSON value, huge and non-finite
numbers, deep nesting). Segment lengths stay under 1 MiB so that a lying `lens` cannot make
the blocking reader allocate gigabytes on a shared test machine.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import fuzzing
from tsctl.ipc.codec import (
    MAGIC,
    PREFIX,
    VERSION,
    FrameReader,
    ProtocolError,
    encode,
    recv_message,
)
from tsctl.ipc.messages import (
    Batch,
    Described,
    Failure,
    FailureKind,
    Hello,
    Kind,
    Part,
    Result,
    Stop,
    WireRequest,
    WireResponse,
)

pytest_generate_tests = fuzzing.pytest_generate_tests

SAMPLES = [
    Hello(4242),
    Stop("bye"),
    Batch(
        7,
        [
            WireRequest("r1", [Part("body", "application/json", b'{"a": 1}')], [("x", "y")]),
            WireRequest("r2", [Part("data", "", b"\x00\xff"), Part("f", "t", b"")], []),
        ],
    ),
    Result(
        7,
        [WireResponse(200, "text/plain", b"ok", [("h", "v")], "OK", None)],
        None,
        1.5,
        [],
    ),
    Result(
        8,
        [],
        Failure(FailureKind.INVALID_INPUT, "bad", "detail", 418),
        0.0,
        [],
    ),
    Described(b"{}", None),
]
INF = float("inf")
NAN = float("nan")


def frame(message: Any) -> bytes:
    return b"".join(bytes(b) for b in encode(message))


def raw_frame(kind: int, meta: bytes, payload: bytes = b"") -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind, len(meta), len(payload)) + meta + payload


def read_both(data: bytes) -> None:
    """Feed `data` to both readers; only the documented outcomes may come out."""
    with contextlib.suppress(ProtocolError, EOFError):
        recv_message(io.BytesIO(data))

    with contextlib.suppress(ProtocolError):
        FrameReader().feed(data)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(frame(draw(st.sampled_from(SAMPLES))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


#: JSON leaves, infinities and integers beyond a float included
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**1100), 2**1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
KEYS = ["id", "reqs", "res", "fail", "ms", "metrics", "pid", "spec", "reason", "lens"]


@st.composite
def arbitrary_meta_frames(draw: st.DrawFn) -> bytes:
    """A well-formed prefix; meta of the message's keys (or others) with arbitrary values."""
    kind = draw(st.sampled_from([int(k) for k in Kind] + [0, 200]))
    lens = draw(st.lists(st.integers(0, 64), max_size=4))
    meta: dict[str, Any] = draw(
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), JSON_VALUES, max_size=6)
    )
    if draw(st.booleans()):
        meta["lens"] = lens
    payload = draw(st.binary(min_size=sum(lens), max_size=sum(lens)))
    encoded = json.dumps(meta, allow_nan=True).encode()
    return raw_frame(kind, encoded, payload)


def test_random_bytes(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(
        st.binary(max_size=256) | st.binary(max_size=32).map(lambda b: MAGIC + bytes([VERSION]) + b)
    )
    def check(data: bytes) -> None:
        read_both(data)

    check()


def test_mutated_frames(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(mutated_frames())
    def check(data: bytes) -> None:
        read_both(data)

    check()


def test_arbitrary_meta(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(arbitrary_meta_frames())
    def check(data: bytes) -> None:
        read_both(data)

    check()


@pytest.mark.parametrize(
    ("kind", "meta"),
    [
        pytest.param(Kind.HELLO, {"pid": INF}, id="pid-inf"),
        pytest.param(Kind.HELLO, {"pid": NAN}, id="pid-nan"),
        pytest.param(Kind.STOP, {"reason": 10**400}, id="reason-huge"),
        pytest.param(Kind.BATCH, {"id": -INF, "reqs": []}, id="batch-id-inf"),
        pytest.param(
            Kind.RESULT, {"id": INF, "res": [], "fail": None, "ms": 0}, id="result-id-inf",
        ),
        pytest.param(
            Kind.RESULT, {"id": 1, "res": [], "fail": None, "ms": 10**400}, id="ms-huge",
        ),
        pytest.param(
            Kind.RESULT, {"id": 1, "res": [], "fail": ["InvalidInput", "m", "d", INF], "ms": 1},
            id="status-inf",
        ),
        pytest.param(
            Kind.RESULT,
            {"id": 1, "res": [], "fail": None, "ms": 1, "metrics": [["a", "b", "c", 10**400, {}]]},
            id="metric-huge",
        ),
        pytest.param(Kind.ASSIGN, {"spec": 5}, id="spec-int"),
        pytest.param(Kind.ASSIGN, {"spec": {"model_name": 5}}, id="spec-partial"),
    ],
)  # fmt: skip
def test_numbers_a_reader_converts(kind: Kind, meta: dict[str, Any]) -> None:
    """Hand-picked metas whose numbers the reader converts with int()/float(): Infinity, NaN,
    integers too large for a float."""
    read_both(raw_frame(kind, json.dumps({**meta, "lens": []}, allow_nan=True).encode()))


def test_deeply_nested_meta() -> None:
    """A meta of 100,000 nested lists: a `ProtocolError`, not a `RecursionError`."""
    meta = b'{"lens": [], "reason": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    read_both(raw_frame(Kind.STOP, meta))
