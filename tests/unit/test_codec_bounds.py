"""The codec's bounds (`tsctl.ipc.codec`): what a request adds to a batch frame's meta is
bounded before it is queued, `encode` refuses a meta over `MAX_META`, the frontend's reader
skips a body over its limit without holding it, and the worker's reader recovers from a frame
it cannot read, so that the next frame is read."""

from __future__ import annotations

import io

import pytest

from tests.unit.test_codec import frame, raw_frame
from tsctl.ipc.codec import (
    BATCH_META_OVERHEAD,
    MAX_META,
    FrameReader,
    FrameRejected,
    FrameTooLarge,
    ProtocolError,
    encode,
    recv_message,
    request_meta_budget,
    request_meta_size,
)
from tsctl.ipc.messages import (
    Batch,
    Chunk,
    Described,
    FailureKind,
    Hello,
    Kind,
    Message,
    Part,
    Result,
    WireRequest,
    WireResponse,
)

REQUESTS = [
    WireRequest("r", [], []),
    WireRequest("r" * 36, [Part("body", "application/json", b"{}")], [("host", "h")]),
    WireRequest("r", [Part("\x01" * 5000, "", b"x" * 12345)], []),  # 6-byte escapes
    WireRequest("r", [Part("\U0001f600" * 7000, "", b"")], []),  # 12-byte surrogate pairs
    WireRequest("r", [Part(str(i), "text/plain", b"1") for i in range(20_000)], []),
    WireRequest("r", [], [("x-" + "\x7f" * 30_000, "\x00" * 30_000)]),
]


def meta_len(message: Message) -> int:
    return len(encode(message)[1])


@pytest.mark.parametrize("request_", REQUESTS, ids=range(len(REQUESTS)))
def test_request_meta_size_bounds_what_a_request_adds(request_: WireRequest) -> None:
    size = request_meta_size(request_)
    assert meta_len(Batch(123456, [request_])) <= BATCH_META_OVERHEAD + size
    assert meta_len(Batch(123456, [request_] * 3)) <= BATCH_META_OVERHEAD + 3 * size
    exact = meta_len(Batch(1, [request_, request_])) - meta_len(Batch(1, [request_]))
    assert size >= exact
    if size > 1 << 16:  # large ones are measured, not guessed
        assert size <= exact + 8


def test_requests_within_the_budget_fit_a_frame_of_their_batch_size() -> None:
    name = "\x01" * (request_meta_budget(4) // 6 - 64)
    request = WireRequest("r", [Part(name, "", b"")], [])
    assert request_meta_size(request) <= request_meta_budget(4)
    encode(Batch(1, [request] * 4))  # no FrameTooLarge


def test_encode_refuses_a_meta_over_max_meta() -> None:
    huge = WireRequest("r", [Part("\x01" * (MAX_META // 6 + 1), "", b"")], [])
    assert request_meta_size(huge) > request_meta_budget(1)
    with pytest.raises(FrameTooLarge, match="exceeds the limit"):
        encode(Batch(1, [huge]))


def read_bounded(data: bytes, max_body: int, frames: int = 1) -> tuple[list[Message], int]:
    """`frames` messages read by a `FrameReader` fed `data` 64 KiB at a time (as a socket
    delivers it), and the most bytes the reader held at once."""
    reader = FrameReader(max_body)
    read = [m for i in range(0, len(data), 1 << 16) for m in reader.feed(data[i : i + (1 << 16)])]
    assert len(read) == frames and reader.idle
    return read, reader.most_held


def test_a_body_over_the_limit_is_skipped_not_held() -> None:
    big = b"\x07" * 1_000_000
    result = Result(3, [WireResponse(body=b"ok"), WireResponse(200, "x/y", big)], None, 1.0)
    (read, _), largest = read_bounded(frame(result) + frame(Hello(9)), 1000, frames=2)
    assert isinstance(read, Result)
    assert read.responses[0].body == b"ok" and read.responses[0].failure is None
    failure = read.responses[1].failure
    assert failure is not None and failure.kind is FailureKind.RESPONSE_TOO_LARGE
    assert failure.message == "the response of 1000000 bytes exceeds max_response_size (1000)"
    assert read.responses[1].body == b""
    assert largest < len(big)  # read in pieces, dropped as they came


def test_the_frame_after_a_skipped_body_reads_normally() -> None:
    chunk = Chunk(1, [WireResponse(body=b"y" * 5000)])
    read, _ = read_bounded(frame(chunk) + frame(Hello(9)), 4999, frames=2)
    assert isinstance(read[0], Chunk) and read[0].responses[0].failure is not None
    assert read[1] == Hello(9)


def test_a_described_body_over_the_limit_is_a_failure() -> None:
    [read], _ = read_bounded(frame(Described(b"d" * 100)), 99)
    assert isinstance(read, Described) and read.body == b""
    assert read.failure is not None and read.failure.kind is FailureKind.RESPONSE_TOO_LARGE


def test_a_body_at_the_limit_is_read() -> None:
    [read], _ = read_bounded(frame(Result(1, [WireResponse(body=b"z" * 100)])), 100)
    assert isinstance(read, Result) and read.responses[0].body == b"z" * 100


def test_a_large_body_in_a_frame_without_responses_is_a_protocol_error() -> None:
    batch = Batch(1, [WireRequest("r", [Part("body", "", b"b" * 100)], [])])
    with pytest.raises(ProtocolError, match="over the limit"):
        read_bounded(frame(batch), 10)


def rejected_then_hello(data: bytes) -> FrameRejected:
    stream = io.BytesIO(data + frame(Hello(7)))
    with pytest.raises(FrameRejected) as caught:
        recv_message(stream, recover=True)
    assert recv_message(stream, recover=True) == Hello(7)  # still in step
    return caught.value


def test_the_worker_recovers_from_a_meta_over_max_meta() -> None:
    oversized = raw_frame(b"{" * 10, b"p" * 50, kind=Kind.BATCH, meta_len=MAX_META + 1)
    oversized += b"{" * (MAX_META + 1 - 10)  # the rest of the meta
    rejected = rejected_then_hello(oversized)
    assert rejected.kind == Kind.BATCH and "too large" in str(rejected)


@pytest.mark.parametrize(
    "data",
    [
        raw_frame(b"not json", b"abc", kind=Kind.BATCH),
        raw_frame(b"[" * 100_000, b"abc", kind=Kind.BATCH),
        raw_frame({"id": 1, "reqs": [["r", [["a", ""]]]], "lens": [3]}, b"abc", kind=Kind.BATCH),
        raw_frame({"lens": [1]}, b"abc", kind=Kind.BATCH),
    ],
    ids=["not json", "nested meta", "wrong shape", "lens short"],
)
def test_the_worker_recovers_from_a_malformed_frame(data: bytes) -> None:
    assert rejected_then_hello(data).kind == Kind.BATCH


def test_a_broken_prefix_is_not_recovered_from() -> None:
    data = b"XX" + frame(Hello(1))[2:]
    with pytest.raises(ProtocolError) as caught:
        recv_message(io.BytesIO(data), recover=True)
    assert not isinstance(caught.value, FrameRejected)


def test_without_recover_nothing_past_an_oversized_meta_is_read() -> None:
    data = raw_frame(b"{}", kind=Kind.BATCH, meta_len=MAX_META + 1)
    stream = io.BytesIO(data)
    with pytest.raises(ProtocolError) as caught:
        recv_message(stream)
    assert not isinstance(caught.value, FrameRejected) and stream.tell() == 12
