"""`tsctl.worker.service.Service.run` on inputs it cannot decode: the request fails alone as
invalid input, its batch-mates reach the handler and are answered in their places, chunks
included; input that is merely not JSON still reaches the handler as bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tsctl.ipc.messages import Batch, Chunk, FailureKind, Part, WireRequest
from tsctl.worker.context import Context
from tsctl.worker.service import Service, json_indented

DEEP = b"[" * 200_000


def request(request_id: str, body: bytes) -> WireRequest:
    return WireRequest(request_id, [Part("body", "application/json", body)], [])


def service(entry: Any) -> Service:
    return Service(entry, Context("m", "/nowhere", {}, 1, None, True, "test", {}))


def test_undecodable_json_fails_alone_and_its_batch_mates_are_answered() -> None:
    seen: list[Any] = []

    def entry(rows: list[dict[str, Any]], context: Context) -> list[Any]:
        seen.extend(rows)
        return [
            {"n": row["body"]["n"], "id": context.get_request_id(i)} for i, row in enumerate(rows)
        ]

    batch = Batch(1, [request("a", b'{"n": 1}'), request("b", DEEP), request("c", b'{"n": 3}')])
    result = service(entry).run(batch)
    assert result.failure is None
    assert [row["body"]["n"] for row in seen] == [1, 3]
    first, deep, last = result.responses
    assert json.loads(first.body) == {"n": 1, "id": "a"}
    assert json.loads(last.body) == {"n": 3, "id": "c"}
    assert deep.failure is not None and deep.failure.kind is FailureKind.INVALID_INPUT
    assert deep.failure.message == "input 'body': JSON nested too deeply"


def test_a_batch_of_undecodable_requests_never_reaches_the_handler() -> None:
    def entry(rows: list[Any], context: Context) -> list[Any]:
        raise AssertionError("the handler was called")

    result = service(entry).run(Batch(2, [request("a", DEEP)]))
    assert [r.failure.kind for r in result.responses if r.failure] == [FailureKind.INVALID_INPUT]


def test_chunks_keep_their_places_around_a_refused_request() -> None:
    def entry(rows: list[Any], context: Context) -> Iterator[list[str]]:
        yield [f"early{i}" for i in range(len(rows))]
        yield [f"last{i}" for i in range(len(rows))]

    chunks: list[Chunk] = []
    batch = Batch(3, [request("a", DEEP), request("b", b"{}")])
    result = service(entry).run(batch, chunks.append)
    [chunk] = chunks
    assert chunk.responses[0].failure is not None and chunk.responses[1].body == b"early0"
    assert result.responses[0].failure is not None and result.responses[1].body == b"last0"


def test_input_that_is_not_json_reaches_the_handler_as_bytes() -> None:
    def entry(rows: list[Any], context: Context) -> list[str]:
        return [type(row["body"]).__name__ for row in rows]

    result = service(entry).run(Batch(4, [request("a", b"[1, 2"), request("b", b"\xff")]))
    assert [r.body for r in result.responses] == [b"bytes", b"bytes"]  # bytearray in a worker


@pytest.mark.parametrize(
    "answer",
    [
        [0.5, -1.25, 3.0, 1e-05, 1.5e300, -0.0],
        [1, 2, -3, 10**30],
        [1, 2.5],
        [0.1],
        [],
        [float("nan"), 1.0],
        [float("inf")],
        [True, 1.0],
        [[0.5, 1.0], [2.0]],
        {"a": [1.0]},
        "text",
        [1.0, None],
        [1.0, "a, b"],
    ],
)
def test_answers_are_json_as_torchserve_writes_them(answer: object) -> None:
    assert json_indented(answer) == json.dumps(answer, indent=2).encode()
