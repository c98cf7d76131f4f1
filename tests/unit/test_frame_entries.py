"""A batch whose requests' meta entries were encoded as they were queued (`Batch.entries`,
`codec.request_entry`) is the same frame, byte for byte, as one the codec encodes whole; and
`entry_size` is what each request adds to the frame's meta, never less."""

from __future__ import annotations

import json

import pytest

from tsctl.ipc.codec import (
    FrameTooLarge,
    decode,
    encode,
    entry_size,
    request_entry,
    request_meta_size,
)
from tsctl.ipc.messages import Batch, Kind, Part, WireRequest

REQUESTS = [
    WireRequest("r-1", [Part("body", "application/json", b'{"x": 1}')], [("Host", "h")]),
    WireRequest(
        "r-2",
        [Part("a", "", b"1"), Part('naïve \x01 "q" \U0001f600', "text/plain", bytearray(b"22"))],
        (("x-trace", "é\\\n"), ("explain", "True")),
    ),
    WireRequest("r-3", [], []),
    WireRequest("r-4", [Part("body", "", memoryview(b"x" * 1000))], [("k", "")]),
]


def frame(batch: Batch) -> bytes:
    return b"".join(bytes(b) for b in encode(batch))


@pytest.mark.parametrize("count", [1, 2, 4])
def test_a_batch_of_encoded_entries_is_the_frame_the_codec_writes(count: int) -> None:
    requests = REQUESTS[:count]
    entries = [request_entry(r) for r in requests]
    assert frame(Batch(77, requests, entries)) == frame(Batch(77, requests))


def test_the_frame_of_encoded_entries_decodes_to_the_requests() -> None:
    buffers = encode(Batch(5, REQUESTS, [request_entry(r) for r in REQUESTS]))
    meta = json.loads(bytes(buffers[1]))
    decoded = decode(Kind.BATCH, meta, [bytes(b) for b in buffers[2:]])
    assert isinstance(decoded, Batch)
    assert [r.request_id for r in decoded.requests] == [r.request_id for r in REQUESTS]
    assert decoded.requests[1].parts[1].name == REQUESTS[1].parts[1].name
    assert list(decoded.requests[1].headers) == list(REQUESTS[1].headers)


def test_entry_size_is_what_a_request_adds_at_most() -> None:
    empty = len(encode(Batch(123456, []))[1])
    total = 0
    for request in REQUESTS:
        size = entry_size(request_entry(request), request.parts)
        assert size <= request_meta_size(request)  # the bound it replaces
        total += size
    entries = [request_entry(r) for r in REQUESTS]
    assert len(encode(Batch(123456, REQUESTS, entries))[1]) <= empty + total


def test_a_batch_needs_one_entry_per_request() -> None:
    with pytest.raises(ValueError, match="one entry per request"):
        encode(Batch(1, REQUESTS, [request_entry(REQUESTS[0])]))


def test_a_batch_of_entries_over_the_meta_limit_is_refused() -> None:
    request = WireRequest("big", [], [("h", "v" * (1 << 20))])
    entry = request_entry(request)
    with pytest.raises(FrameTooLarge):
        encode(Batch(1, [request] * 17, [entry] * 17))
