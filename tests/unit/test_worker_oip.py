"""The worker's side of the Open Inference Protocol (tsctl/worker/oip.py) and of per-request
protocols in `Service.run`: real torch, real frames' layout, no processes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tsctl.ipc.messages import Batch, FailureKind, Part, WireRequest
from tsctl.ipc.oip import HEADER_LENGTH, KSERVE_V1_MEDIA, pack
from tsctl.worker import oip
from tsctl.worker.context import Context
from tsctl.worker.service import Service

DTYPES = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}


def raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""


def request(header: dict[str, Any], *blobs: bytes) -> oip.OipRequest:
    media, data = pack(header, blobs)
    return oip.read(media, bytearray(data))


def binary_input(name: str, tensor: torch.Tensor, datatype: str) -> dict[str, Any]:
    size = len(raw(tensor))
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(tensor.shape),
        "parameters": {"binary_data_size": size},
    }


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_binary_and_json_inputs_become_tensors(datatype: str) -> None:
    values = torch.arange(6).reshape(2, 3) % (2 if datatype == "BOOL" else 100)
    tensor = values.to(DTYPES[datatype])
    as_json = {"name": "j", "datatype": datatype, "shape": [2, 3], "data": tensor.tolist()}
    read = request(
        {"inputs": [binary_input("b", tensor, datatype), as_json]},
        raw(tensor),
    )
    row = oip.inputs(read)
    for name in ("b", "j"):
        assert row[name].dtype == DTYPES[datatype]
        assert torch.equal(row[name], tensor), name


def test_an_aligned_blob_is_not_copied_and_an_unaligned_one_is() -> None:
    tensor = torch.arange(4, dtype=torch.float32)
    for pad in range(4):  # the header's length decides where the blob starts
        header = {"inputs": [binary_input("x", tensor, "FP32")], "id": "p" * pad}
        media, data = pack(header, [raw(tensor)])
        buffer = bytearray(data)
        row = oip.inputs(oip.read(media, buffer))
        start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
        offset = len(data) - 16
        assert torch.equal(row["x"], tensor)
        shares = row["x"].data_ptr() == start + offset
        assert shares == ((start + offset) % 4 == 0)


def test_bytes_inputs_are_nested_like_their_shape() -> None:
    items = [b"a", b"", b"\xff\x00", "é".encode()]
    blob = b"".join(len(i).to_bytes(4, "little") + i for i in items)
    spec = {"name": "s", "datatype": "BYTES", "shape": [2, 2]}
    read = request(
        {
            "inputs": [
                {**spec, "parameters": {"binary_data_size": len(blob)}},
                {**spec, "name": "t", "data": [["x", "y"], ["z", "é"]]},
            ]
        },
        blob,
    )
    row = oip.inputs(read)
    assert row["s"] == [[b"a", b""], [b"\xff\x00", "é".encode()]]
    assert row["t"] == [[b"x", b"y"], [b"z", "é".encode()]]


def test_parameters_id_and_requested_outputs_are_attributes() -> None:
    header = {
        "id": "42",
        "parameters": {"scale": 2},
        "inputs": [{"name": "parameters", "datatype": "INT8", "shape": [1], "data": [1]}],
        "outputs": [{"name": "y"}],
    }
    row = oip.inputs(request(header))
    assert list(row) == ["parameters"]  # no input name is reserved
    assert (row.id, row.parameters, row.outputs) == ("42", {"scale": 2}, ["y"])


@pytest.mark.parametrize(
    ("header", "blobs", "message"),
    [
        ({"inputs": []}, (), 'no "inputs"'),
        (
            {"inputs": [{"name": "x", "datatype": "F32", "shape": [1], "data": [1]}]},
            (),
            "unknown datatype",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]},
            (),
            "list of sizes",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]},
            (),
            "do not fit",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, (), "neither"),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": ["a"]}]},
            (),
            "no INT8",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            (b"abcd",),
            "do not hold",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            (b"abcd",),
            "runs past",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]},
            (b"extra",),
            "more than",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "s",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 5},
                    }
                ]
            },
            (b"\x09\x00\x00\x00a",),
            "runs past",
        ),
    ],
)
def test_what_a_client_got_wrong_is_named(
    header: dict[str, Any], blobs: tuple[bytes, ...], message: str
) -> None:
    with pytest.raises(oip.OipInputError, match=message):
        oip.inputs(request(header, *blobs))


def test_answers_become_outputs_binary_or_json_as_asked() -> None:
    header = {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}],
        "outputs": [
            {"name": "t"},
            {"name": "n", "parameters": {"binary_data": False}},
            {"name": "s"},
        ],
    }
    answer = {"n": [[1.5, 2.5]], "s": ["ab", b"c"], "t": torch.tensor([1, 2], dtype=torch.int16)}
    reply = oip.respond(request(header), answer, {"model_name": "m"})
    assert reply.content_type == "application/octet-stream"
    length = int(dict(reply.headers)[HEADER_LENGTH])
    doc = json.loads(reply.body[:length])
    assert [o["name"] for o in doc["outputs"]] == ["t", "n", "s"]
    assert doc["outputs"][1] == {
        "name": "n",
        "datatype": "FP32",
        "shape": [1, 2],
        "data": [1.5, 2.5],
    }
    assert doc["outputs"][2]["datatype"] == "BYTES" and doc["outputs"][2]["shape"] == [2]
    assert reply.body[length:] == b"\x01\x00\x02\x00" + b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_a_bare_answer_takes_the_declared_name_and_unknown_outputs_are_refused() -> None:
    read = request({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]})
    reply = oip.respond(read, torch.ones(2), {}, ["y"])
    assert reply.content_type == "application/json"
    assert json.loads(reply.body)["outputs"][0]["name"] == "y"
    assert json.loads(oip.respond(read, 3, {}).body)["outputs"][0]["name"] == "output0"
    asking = request({**read.header, "outputs": [{"name": "z"}]})
    with pytest.raises(oip.OipInputError, match="'z'"):
        oip.respond(asking, {"y": 1}, {})


# Service.run: protocols per request


def handle(data: Any, context: Any) -> Any:
    answers: list[Any] = []
    for row in data:
        if isinstance(row, oip.OipInputs):
            answers.append({"x2": row["x"] * 2, "rows": len(data)})
        elif isinstance(row, dict) and "body" in row:
            answers.append({"rows": len(data)})
        else:
            answers.append(row * 10)
    return answers


def oip_part(value: int) -> Part:
    header = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [value]}]}
    media, data = pack(header)
    return Part("body", media, bytearray(data))


def test_one_batch_mixes_protocols_and_a_bad_request_fails_alone() -> None:
    service = Service(
        handle, Context("m", "/nowhere", {"model": {"modelVersion": "3"}}, 4, None, "t")
    )
    bad_media, bad_data = pack(
        {"inputs": [{"name": "x", "datatype": "NOPE", "shape": [1], "data": [1]}]}
    )
    batch = Batch(
        1,
        [
            WireRequest("a", [Part("body", "application/json", b'{"q": 1}')]),
            WireRequest("b", [Part("body", KSERVE_V1_MEDIA, b'{"instances": [1, 2]}')]),
            WireRequest("c", [oip_part(21)]),
            WireRequest("d", [Part("body", bad_media, bytearray(bad_data))]),
        ],
    )
    result = service.run(batch)
    assert result.failure is None
    plain, v1, v2, bad = result.responses
    assert json.loads(plain.body) == {"rows": 4}
    assert json.loads(v1.body) == {"predictions": [10, 20]}
    doc = json.loads(v2.body)
    assert (doc["model_name"], doc["model_version"]) == ("m", "3")
    assert doc["outputs"][0] == {"name": "x2", "datatype": "INT32", "shape": [1], "data": [42]}
    assert doc["outputs"][1]["data"] == [4]
    assert bad.failure is not None and bad.failure.kind is FailureKind.INVALID_INPUT
    assert "NOPE" in bad.failure.message
