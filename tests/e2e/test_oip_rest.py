"""The Open Inference Protocol (v2) over REST, judged by clients nobody here wrote:
`tritonclient.http` and kserve's `InferenceRESTClient`, against a real daemon whose echo handler
(tests/fixtures/handlers/protocol_echo.py) answers every input as an output of the same name.

Also: a batch of OIP requests is one handler call, a batch may mix `/predictions`, KServe v1 and
OIP requests, a malformed OIP request fails alone, and handlers written for TorchServe's
`kservev2` envelope keep working. (REST only: tritonclient's and kserve's gRPC modules define
the same protobuf package and must not be imported here.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import kserve_client
from tests.support.daemon import Response, Server, make_archive

pytestmark = pytest.mark.slow

BATCH = 5
DECLARED = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": ml_dtypes.bfloat16,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("oip"))
    make_archive(srv.store, "echo", "protocol_echo")
    make_archive(srv.store, "typed", "protocol_echo", config=DECLARED)
    batched = {"batchSize": BATCH, "maxBatchDelay": 5000}
    make_archive(srv.store, "batcher", "protocol_echo", config=batched)
    srv.start("echo.mar", "typed.mar", "batcher.mar")
    yield srv
    srv.stop()


def address(srv: Server) -> str:
    return srv.inference.removeprefix("http://")


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> Any:
    if datatype == "BYTES":
        items = [b"a", b"bc", "é".encode(), b"", b"de f", b"xyz"]
        return np.array(items, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(6) % 2 == 0).reshape(shape)
    values = np.arange(6).reshape(shape) * 3 + 1
    return values.astype(NUMPY_TYPES[datatype])


def oip_body(header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if blobs else {}
    return b"".join((head, *blobs)), headers


def infer(srv: Server, model: str, header: dict[str, Any], *blobs: bytes, **kw: Any) -> Response:
    body, headers = oip_body(header, blobs)
    headers.update(kw.pop("headers", {}))
    return srv.request("POST", f"/v2/models/{model}/infer", body, headers, **kw)


def small(name: str = "x", value: int = 0, **params: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "inputs": [{"name": name, "datatype": "INT32", "shape": [1], "data": [value]}]
    }
    if params:
        header["parameters"] = params
    return header


def output(reply: Response, name: str) -> Any:
    for out in reply.json()["outputs"]:
        if out["name"] == name:
            return out
    raise AssertionError(f"no output {name} in {reply.body[:300]!r}")


# tritonclient


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips_through_tritonclient(server: Server, binary: bool) -> None:
    client = triton.InferenceServerClient(address(server))
    for datatype in [*NUMPY_TYPES, "BYTES"]:
        if datatype == "BF16" and not binary:
            continue  # tritonclient sends BF16 as binary data only
        data = sample(datatype)
        tensor = triton.InferInput(f"in_{datatype}", list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        wanted = triton.InferRequestedOutput(f"in_{datatype}", binary_data=binary)
        result = client.infer("echo", [tensor], outputs=[wanted], request_id=f"r-{datatype}")
        got = result.as_numpy(f"in_{datatype}")
        assert got is not None, datatype
        assert got.shape == data.shape, datatype
        if datatype == "BYTES" and not binary:
            got = np.array([str(v).encode() for v in got.reshape(-1)], dtype=np.object_)
        assert np.array_equal(got.reshape(data.shape), data), datatype
        response = result.get_response()
        assert response["id"] == f"r-{datatype}"
        assert response["model_name"] == "echo"
        assert response["model_version"] == "1.0"
        assert result.get_output(f"in_{datatype}")["datatype"] == datatype


def test_tritonclient_defaults_to_binary_outputs_and_gets_every_output(server: Server) -> None:
    client = triton.InferenceServerClient(address(server))
    a = triton.InferInput("a", [2, 2], "FP32")
    a.set_data_from_numpy(np.ones((2, 2), np.float32))
    b = triton.InferInput("b", [3], "INT64")
    b.set_data_from_numpy(np.array([5, 6, 7], np.int64), binary_data=False)
    result = client.infer("echo", [a, b], parameters={"tag": "hello"})
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["a", "b", "batch_size", "tag"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    assert np.array_equal(result.as_numpy("b"), [5, 6, 7])
    assert result.as_numpy("batch_size").tolist() == [1]
    assert result.as_numpy("tag").tolist() == [b"hello"]  # request parameters reach the handler


def test_requested_outputs_select_and_order(server: Server) -> None:
    client = triton.InferenceServerClient(address(server))
    tensors = []
    for name in ("a", "b", "c"):
        tensor = triton.InferInput(name, [1], "INT32")
        tensor.set_data_from_numpy(np.array([ord(name)], np.int32))
        tensors.append(tensor)
    wanted = [
        triton.InferRequestedOutput("c", binary_data=False),
        triton.InferRequestedOutput("a", binary_data=True),
    ]
    result = client.infer("echo", tensors, outputs=wanted)
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["c", "a"]
    assert outputs[0]["data"] == [ord("c")] and "parameters" not in outputs[0]
    assert result.as_numpy("a").tolist() == [ord("a")]


def test_errors_come_back_as_the_protocol_says(server: Server) -> None:
    client = triton.InferenceServerClient(address(server))
    x = triton.InferInput("x", [1], "INT32")
    x.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as unknown_output:
        client.infer("echo", [x], outputs=[triton.InferRequestedOutput("nope")])
    assert "'nope'" in unknown_output.value.message()
    assert unknown_output.value.status() == "400"
    with pytest.raises(InferenceServerException) as unknown_model:
        client.infer("missing", [x])
    assert unknown_model.value.status() == "404"
    assert "missing" in unknown_model.value.message()
    assert not client.is_model_ready("missing")
    reply = infer(server, "missing", small())
    assert reply.status == 404 and set(reply.json()) == {"error"}


def test_health_and_metadata_through_tritonclient(server: Server) -> None:
    client = triton.InferenceServerClient(address(server))
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("echo")
    assert client.is_model_ready("echo", "1.0")
    meta = client.get_server_metadata()
    assert meta["name"] == "tsctl" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("typed")
    assert model["name"] == "typed" and model["versions"] == ["1.0"]
    assert model["platform"] == "pytorch"
    assert model["inputs"] == DECLARED["inputs"]
    assert model["outputs"] == DECLARED["outputs"]
    assert client.get_model_metadata("echo", "1.0")["inputs"] == []


def test_a_bare_tensor_answer_takes_the_declared_output_name(server: Server) -> None:
    x = sample("FP32")
    reply = infer(
        server,
        "typed",
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.tolist()}],
            "parameters": {"only": "x"},
        },
    )
    assert reply.status == 200, reply.body
    assert [o["name"] for o in reply.json()["outputs"]] == ["y"]
    assert output(reply, "y")["data"] == x.reshape(-1).tolist()
    assert output(reply, "y")["shape"] == [2, 3]
    plain = infer(server, "echo", {**small(), "parameters": {"only": "x"}})
    assert [o["name"] for o in plain.json()["outputs"]] == ["output0"]


# kserve's client


KSERVE_V2 = """
async def main(base):
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        assert await client.is_server_live(base)
        assert await client.is_server_ready(base)
        assert await client.is_model_ready(base, "echo")
        assert not await client.is_model_ready(base, "missing")
        inputs = [InferInput("x", [2, 2], "FP32", data=[1.0, 2.0, 3.0, 4.0])]
        response = await client.infer(base, InferRequest("echo", inputs, request_id="k-1"), "echo")
        assert response.id == "k-1", response.id
        by_name = {o.name: o for o in response.outputs}
        assert by_name["x"].shape == [2, 2], by_name["x"].shape
        assert by_name["x"].data == [1.0, 2.0, 3.0, 4.0], by_name["x"].data
        raw = InferInput("r", [3], "INT16")
        raw.set_data_from_numpy(np.array([-1, 0, 1], np.int16), binary_data=True)
        wanted = [RequestedOutput("r", parameters={"binary_data": True})]
        request = InferRequest("echo", [raw], request_id="k-2", request_outputs=wanted)
        response = await client.infer(base, request, "echo")
        assert [o.name for o in response.outputs] == ["r"]
        assert response.outputs[0].as_numpy().tolist() == [-1, 0, 1]
        bad = InferRequest("echo", [InferInput("x", [3], "FP32", data=[1.0])])
        try:
            await client.infer(base, bad, "echo")
        except Exception as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            raise AssertionError("a shape mismatch was answered")
    finally:
        await client.close()
"""


def test_kserve_rest_client_json_and_binary(server: Server) -> None:
    printed = kserve_client.run(KSERVE_V2, server.inference)
    error = json.loads(printed.splitlines()[-1])["error"]
    assert "do not fit shape" in error and "400" in error


# batches


class Held:
    """A request that holds the worker of `model` until `release()`: requests sent meanwhile
    queue up and are then taken as one batch."""

    def __init__(self, srv: Server, model: str, path: Path, pool: ThreadPoolExecutor) -> None:
        self.srv, self.model, self.path = srv, model, path
        self.first = pool.submit(infer, srv, model, small(hold=str(path)))
        srv.wait_for(lambda: Path(f"{path}.started").exists())

    def release_when_queued(self, count: int) -> None:
        self.srv.wait_for(lambda: self.srv.queued(self.model) == count)
        self.path.touch()
        assert self.first.result(timeout=60).status == 200


def sent(pool: ThreadPoolExecutor, call: Callable[..., Response], *args: Any) -> Future[Response]:
    return pool.submit(call, *args)


def test_concurrent_oip_requests_are_one_handler_batch(server: Server, tmp_path: Path) -> None:
    with ThreadPoolExecutor(BATCH + 1) as pool:
        held = Held(server, "batcher", tmp_path / "go", pool)
        futures = [sent(pool, infer, server, "batcher", small(value=i)) for i in range(BATCH)]
        held.release_when_queued(BATCH)
        replies = [f.result(timeout=60) for f in futures]
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.body
        assert output(reply, "batch_size")["data"] == [BATCH]
        assert output(reply, "x")["data"] == [i]


def test_a_batch_mixes_predictions_v1_and_v2(server: Server, tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        held = Held(server, "batcher", tmp_path / "go", pool)
        plain = sent(pool, server.predict, "batcher", {"x": 1})
        v1_body = json.dumps({"instances": [{"a": 1}, {"a": 2}]})
        v1 = sent(pool, server.request, "POST", "/v1/models/batcher:predict", v1_body)
        v2 = sent(pool, infer, server, "batcher", small(value=7))
        held.release_when_queued(3)
        rows = 4  # one /predictions row, two instances, one OIP request
        assert plain.result(timeout=60).json() == {"echo": {"x": 1}, "batch": rows}
        predictions = v1.result(timeout=60).json()["predictions"]
        assert predictions == [
            {"instance": {"a": 1}, "batch": rows},
            {"instance": {"a": 2}, "batch": rows},
        ]
        answer = v2.result(timeout=60)
        assert output(answer, "batch_size")["data"] == [rows]
        assert output(answer, "x")["data"] == [7]


def test_malformed_oip_requests_fail_alone(server: Server, tmp_path: Path) -> None:
    good = small(value=3)
    cut = json.dumps(good).encode()
    malformed: list[tuple[bytes, dict[str, str], str]] = [
        (b'{"inputs": [', {}, "not valid JSON"),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1]}]}
            ).encode(),
            {},
            "do not fit shape",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP128", "shape": [1], "data": [1]}]}
            ).encode(),
            {},
            "unknown datatype 'FP128'",
        ),
        (cut, {"Inference-Header-Content-Length": str(len(cut) - 5)}, "not valid JSON"),
    ]
    assert len(malformed) + 1 <= BATCH
    path = "/v2/models/batcher/infer"
    with ThreadPoolExecutor(len(malformed) + 2) as pool:
        held = Held(server, "batcher", tmp_path / "go", pool)
        bad = [sent(pool, server.request, "POST", path, b, h) for b, h, _ in malformed]
        fine = sent(pool, infer, server, "batcher", good)
        held.release_when_queued(len(malformed) + 1)
        answer = fine.result(timeout=60)
        assert answer.status == 200, answer.body
        assert output(answer, "x")["data"] == [3]
        assert output(answer, "batch_size")["data"] == [1]  # only it reached the handler
        for future, (_, _, message) in zip(bad, malformed, strict=True):
            reply = future.result(timeout=60)
            assert reply.status == 400, reply.body
            assert set(reply.json()) == {"error"} and message in reply.json()["error"]


def test_the_daemon_checks_the_header_length(server: Server) -> None:
    body = json.dumps(small()).encode()
    for given in (str(len(body) + 1), "0", "-3", "many"):
        reply = server.request(
            "POST",
            "/v2/models/echo/infer",
            body,
            {"Inference-Header-Content-Length": given},
        )
        assert reply.status == 400, given
        assert "Inference-Header-Content-Length" in reply.json()["error"]
    empty = server.request("POST", "/v2/models/echo/infer", b"")
    assert empty.status == 400 and "no body" in empty.json()["error"]


def test_protocol_paths_answer_protocol_errors(server: Server) -> None:
    assert server.request("GET", "/v2/models/echo/infer").status == 405
    assert server.request("POST", "/v2/health/ready").json().keys() == {"error"}
    unknown = server.request("GET", "/v2/models/missing")
    assert unknown.status == 404 and "missing" in unknown.json()["error"]
    assert server.request("GET", "/v2/models/echo/versions/9.9/ready").status == 404
    assert server.request("GET", "/v2/nothing").json().keys() == {"error"}
    access = server.access_line("GET /v2/models/missing HTTP")
    assert '"GET /v2/models/missing HTTP/1.1" 404' in access


def test_max_request_size_bounds_oip_bodies(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"max_request_size": 2048})
    make_archive(srv.store, "echo", "protocol_echo")
    srv.start("echo.mar")
    try:
        blob = bytes(4096)
        header = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "UINT8",
                    "shape": [4096],
                    "parameters": {"binary_data_size": 4096},
                }
            ]
        }
        reply = infer(srv, "echo", header, blob)
        assert reply.status == 413 and "max_request_size" in reply.json()["error"]
    finally:
        srv.stop()


# TorchServe's kservev2 envelope


def test_kservev2_envelope_handlers_keep_working(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"service_envelope": "kservev2"})
    make_archive(srv.store, "twice", "kservev2_twice")
    srv.start("twice.mar")
    try:
        client = triton.InferenceServerClient(address(srv))
        x = triton.InferInput("x", [2, 2], "FP32")
        x.set_data_from_numpy(np.array([[1, 2], [3, 4]], np.float32), binary_data=True)
        result = client.infer("twice", [x], request_id="env-1")
        assert result.get_response()["id"] == "env-1"
        assert result.get_output("x")["datatype"] == "FP64"  # the envelope types as numpy
        assert result.as_numpy("x").tolist() == [2.0, 4.0, 6.0, 8.0]
        header = {
            "id": "j",
            "inputs": [{"name": "t", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
        }
        reply = infer(srv, "twice", header)
        assert reply.json()["id"] == "j"
        assert output(reply, "t")["data"] == [2, 4]
        plain = srv.predict("twice", header)  # TorchServe's path, through the envelope
        assert plain.status == 200 and plain.json()["outputs"][0]["data"] == [2, 4]
    finally:
        srv.stop()


def test_token_needed_except_for_health(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "echo", "protocol_echo")
    srv.start("echo.mar", auth=True)
    try:
        key = json.loads((srv.root / "key_file.json").read_text())["inference"]["key"]
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/echo/ready"):
            assert srv.request("GET", path).status == 200, path
        assert srv.request("GET", "/v1/models/echo").json() == {"name": "echo", "ready": True}
        for path in ("/v2", "/v2/models/echo", "/v1/models"):
            refused = srv.request("GET", path)
            assert refused.status == 400 and set(refused.json()) == {"error"}, path
        assert infer(srv, "echo", small()).status == 400
        bearer = {"Authorization": f"Bearer {key}"}
        assert infer(srv, "echo", small(), headers=bearer).status == 200
        assert srv.request("GET", "/v2/models/echo", headers=bearer).status == 200
    finally:
        srv.stop()
