"""The kserve (v1) and kservev2 (Open Inference Protocol) request envelopes, called directly
with a real `Context` (the `compat` fixture, tests/e2e/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.envelopes import Recorder, make_context
from tsctl.worker import envelope
from tsctl.worker.envelope import EnvelopeInputError


def test_kserve_predictions_and_explanations(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kserve")
    rows = [
        {"body": {"instances": [[1, 2]]}},
        {"body": bytearray(b'{"instances": [{"data": "aGk="}, 3]}')},
    ]
    answers = handle(rows, make_context({}, {"explain": "True"}))
    assert answers == [
        {"predictions": [{"echo": [1, 2], "batch": 3}]},
        {"explanations": [{"echo": {"data": "aGk="}, "batch": 3}, {"echo": 3, "batch": 3}]},
    ]


def test_kserve_single_request_keeps_any_result(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else {"sum": 6}, "kserve")
    assert handle([{"body": {"instances": [1, 2, 3]}}], make_context({})) == [
        {"predictions": {"sum": 6}}
    ]


def test_kserve_without_instances_fails_alone(compat: None) -> None:
    handle = envelope.wrap(Recorder().handle, "kserve")
    answers = handle([{"body": {"inputs": []}}], make_context({}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert 'the kserve envelope expects {"instances": [...]}' in answers[0].message


# --- kservev2 (Open Inference Protocol) ----------------------------------------------------


def v2_request(*inputs: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(inputs)}
    if request_id is not None:
        body["id"] = request_id
    return {"body": body}


def test_kservev2_reads_tensors_and_writes_outputs(compat: None) -> None:
    seen: list[Any] = []

    def handler(data: Any, context: Any) -> Any:
        if data is None:
            return None
        seen.append((data, list(context.input_names)))
        return [item["data"] for item in data]

    handle = envelope.wrap(handler, "kservev2")
    rows = [
        v2_request(
            {"name": "m", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]},
            {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hello", "ignored"]},
            request_id="abc",
        ),
        v2_request({"name": "n", "shape": [-1, 1], "datatype": "INT64", "data": [[7], [8]]}),
    ]
    context = make_context({}, {})
    answers = handle(rows, context)
    data, names = seen[0]
    assert [d["data"] for d in data] == [[[1.0, 2.0], [3.0, 4.5]], "hello", [[7], [8]]]
    assert data[0]["datatype"] == "FP32"  # the rest of each input object is kept
    assert names == ["m", "s", "n"]
    assert not hasattr(context, "input_names")  # only while the handler runs
    assert answers == [
        {
            "id": "abc",
            "model_name": "echo",
            "model_version": "2.0",
            "outputs": [
                {"name": "m", "datatype": "FP64", "data": [1.0, 2.0, 3.0, 4.5], "shape": [4]},
                {"name": "s", "datatype": "BYTES", "data": ["hello"], "shape": [1]},
            ],
        },
        {
            "id": "req-1",  # no id of its own: the server's request id
            "model_name": "echo",
            "model_version": "2.0",
            "outputs": [{"name": "n", "datatype": "INT64", "data": [7, 8], "shape": [2]}],
        },
    ]


def test_kservev2_infers_datatypes_like_torchserve(compat: None) -> None:
    import torch

    results = [
        torch.tensor([[1.5, 2.0]]),
        torch.tensor([1, 2], dtype=torch.int32),
        [True, False],
        [[1, 2], [3, 4]],
        [1, 2.5],
        [1, "a", 2.5],
        "text",
        7,
        [],
    ]
    names = [f"i{k}" for k in range(len(results))]
    handle = envelope.wrap(lambda data, ctx: None if data is None else results, "kservev2")
    inputs = [{"name": n, "shape": [1], "datatype": "INT64", "data": [0]} for n in names]
    [answer] = handle([v2_request(*inputs, request_id="t")], make_context({}))
    outputs = {o["name"]: (o["datatype"], o["data"], o["shape"]) for o in answer["outputs"]}
    assert outputs == {
        "i0": ("FP32", [1.5, 2.0], [2]),
        "i1": ("INT32", [1, 2], [2]),
        "i2": ("BOOL", [True, False], [2]),
        "i3": ("INT64", [1, 2, 3, 4], [4]),
        "i4": ("FP64", [1.0, 2.5], [2]),
        "i5": ("BYTES", ["1", "a", "2.5"], [3]),
        "i6": ("BYTES", ["text"], [1]),
        "i7": ("INT64", [7], [1]),
        "i8": ("FP64", [], [0]),
    }


def test_kservev2_fewer_results_than_inputs_for_one_request(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [[1]], "kservev2")
    two = [{"name": n, "shape": [1], "datatype": "FP32", "data": [1]} for n in ("a", "b")]
    [answer] = handle([v2_request(*two, request_id="x")], make_context({}))
    assert answer["outputs"] == [{"name": "a", "datatype": "INT64", "data": [1], "shape": [1]}]


def test_kservev2_more_results_than_inputs_fails(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [1, 2], "kservev2")
    one = {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}
    with pytest.raises(ValueError, match="returned 2 results for 1 inputs"):
        handle([v2_request(one)], make_context({}))


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "2 values do not fit"),
        ({"name": "x", "shape": "3", "datatype": "FP32", "data": [1]}, '"shape" must be a list'),
        ({"name": "x", "shape": [-1, -1], "datatype": "FP32", "data": [1]}, "at most one -1"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, 'input 0 has no "name"'),
        ({"name": "x", "shape": [1], "data": [1]}, "input 'x' has no \"datatype\""),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "input 'x' has no \"data\" list"),
        ({"name": "x", "shape": [1], "datatype": "BYTES", "data": []}, '"data" is empty'),
        ("x", "input 0 is not an object"),
    ],
)
def test_kservev2_bad_input_fails_alone(compat: None, tensor: Any, needle: str) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kservev2")
    good = {"name": "ok", "shape": [1], "datatype": "INT64", "data": [3]}
    answers = handle([v2_request(tensor), v2_request(good)], make_context({}, {}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert needle in answers[0].message
    assert answers[1]["outputs"][0]["name"] == "ok"
    assert len(recorder.calls) == 1


def test_kservev2_without_inputs_fails_alone(compat: None) -> None:
    handle = envelope.wrap(Recorder().handle, "kservev2")
    answers = handle([{"body": bytearray(b'{"instances": [1]}')}], make_context({}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert 'the body has no "inputs" list' in answers[0].message
