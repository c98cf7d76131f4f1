"""The json request envelope (`service_envelope=json`), called directly with a real
`Context` (the `compat` fixture, tests/e2e/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.envelopes import Recorder, make_context
from tsctl.worker import envelope
from tsctl.worker.envelope import EnvelopeInputError


def test_json_joins_instances_and_gives_each_request_its_share(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    rows = [
        {"body": {"instances": [1, {"a": [2, 3]}]}},
        {"body": bytearray(b'{"instances": ["x"]}')},  # a body that was not application/json
    ]
    answers = handle(rows, make_context({}, {}))
    assert recorder.calls == [[1, {"a": [2, 3]}, "x"]]  # one handler call for the batch
    assert answers == [
        '{"predictions": [{"echo": 1, "batch": 3}, {"echo": {"a": [2, 3]}, "batch": 3}]}',
        '{"predictions": [{"echo": "x", "batch": 3}]}',
    ]


def test_json_decodes_b64_instances_and_fields(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    rows = [{"body": {"instances": [{"b64": "aGk="}, {"img": {"b64": "YQ=="}, "k": 1}]}}]
    assert handle(rows, make_context({})) == [
        '{"predictions": [{"echo": "hi", "batch": 2}, {"echo": {"img": "a", "k": 1}, "batch": 2}]}'
    ]
    assert recorder.calls == [[b"hi", {"img": b"a", "k": 1}]]


def test_json_single_request_takes_the_results_as_torchserve_does(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [len(data)], "json")
    assert handle([{"body": {"instances": [7, 8, 9]}}], make_context({})) == [
        '{"predictions": [3]}'
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (bytearray(b"not json"), "this body is not JSON"),
        ({"rows": [1]}, 'the body has no "instances" list'),
        ({"instances": {"a": 1}}, 'the body has no "instances" list'),
        ([1, 2], "not a JSON array"),
        ({"instances": [{"b64": "a"}]}, 'an instance\'s "b64" value is not valid base64'),
    ],
)
def test_json_bad_request_fails_alone(compat: None, body: Any, needle: str) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    answers = handle([{"body": body}, {"body": {"instances": [5]}}], make_context({}, {}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert needle in answers[0].message
    assert answers[1] == '{"predictions": [{"echo": 5, "batch": 1}]}'
    assert recorder.calls == [[5]]


def test_json_batch_of_bad_requests_skips_the_handler(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    answers = handle([{"body": b"{"}, {"body": {}}], make_context({}, {}))
    assert all(isinstance(a, EnvelopeInputError) for a in answers)
    assert recorder.calls == []


def test_several_requests_need_one_result_per_input(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else ["only one"], "json")
    rows = [{"body": {"instances": [1]}}, {"body": {"instances": [2]}}]
    with pytest.raises(ValueError, match="returned 1 results for 2 inputs from 2 requests"):
        handle(rows, make_context({}, {}))
