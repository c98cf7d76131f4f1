"""The Open Inference Protocol over gRPC (`grpc_oip_port`) against a real daemon, judged by
clients nobody here wrote: tritonclient's `InferenceServerClient` in this process, and
kserve's `InferenceGRPCClient` in a subprocess (kserve's generated code defines protobuf
package `inference` too, and refuses to load beside tritonclient's in one process). Typed
`contents` are sent with tsctl's own generated stub, which shares a process with tritonclient
because tools/gen_protos.py gives it a descriptor pool of its own.

The model is tests/fixtures/handlers/oip_echo.py: each input comes back as an output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support.cli import BIN
from tests.support.daemon import Server, make_archive
from tsctl.local import pidfile

pytestmark = pytest.mark.slow

DECLARED = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a queue of 4 per model: the batching test fills one
    srv = Server(tmp_path_factory.mktemp("oip-grpc"), properties={"job_queue_size": 4})
    make_archive(srv.store, "echo", "oip_echo", config=DECLARED)
    make_archive(srv.store / "v2", "echo", "oip_echo", version="2.0")
    make_archive(srv.store, "batched", "oip_echo", config={"batchSize": 4, "maxBatchDelay": 60000})
    srv.start("echo.mar", "v2/echo.mar", "echo2=echo.mar", "batched.mar")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def address(server: Server) -> str:
    assert server.info is not None and server.info.grpc_oip_address
    return server.info.grpc_oip_address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Any]:
    with triton.InferenceServerClient(address) as found:
        yield found


def tensor(name: str, array: np.ndarray, datatype: str) -> Any:
    given = triton.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array)
    return given


#: (datatype, an array of it)
EVERY_DATATYPE = [
    ("BOOL", np.array([[True, False, True]], dtype=bool)),
    ("UINT8", np.array([[0, 7, 255]], dtype=np.uint8)),
    ("UINT16", np.array([0, 65535], dtype=np.uint16)),
    ("UINT32", np.array([[4294967295]], dtype=np.uint32)),
    ("UINT64", np.array([2**64 - 1, 0], dtype=np.uint64)),
    ("INT8", np.array([-128, 127], dtype=np.int8)),
    ("INT16", np.array([[-32768], [32767]], dtype=np.int16)),
    ("INT32", np.arange(12, dtype=np.int32).reshape(2, 3, 2)),
    ("INT64", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -2.0, 65504.0], dtype=np.float16)),
    ("FP32", np.array([[1.5, -0.25, 3.0e38]], dtype=np.float32)),
    ("FP64", np.array([1e-300, -2.5], dtype=np.float64)),
    ("BF16", np.array([1.0, -2.0, 0.5], dtype=ml_dtypes.bfloat16)),
    ("BYTES", np.array([[b"a", b""], [b"\x00\xff", "é".encode()]], dtype=np.object_)),
]


def test_server_and_model_probes(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("echo")
    assert client.is_model_ready("echo", "1.0")
    assert client.is_model_ready("echo", "2.0")
    assert client.is_model_ready("echo2")
    assert not client.is_model_ready("echo", "9.9")
    assert not client.is_model_ready("nope")


def test_server_metadata(client: Any) -> None:
    import tsctl

    meta = client.get_server_metadata()
    assert meta.name == "tsctl"
    assert meta.version == tsctl.__version__
    assert "binary_tensor_data" in meta.extensions


def test_model_metadata(client: Any) -> None:
    meta = client.get_model_metadata("echo")
    assert meta.name == "echo"
    assert meta.platform == "pytorch"
    assert list(meta.versions) == ["1.0", "2.0"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("x", "FP32", [-1, 3])]
    undeclared = client.get_model_metadata("batched")
    assert list(undeclared.inputs) == [] and list(undeclared.outputs) == []


def test_model_metadata_of_an_unknown_model(client: Any) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "Model not found: nope" in caught.value.message()


@pytest.mark.parametrize(("datatype", "array"), EVERY_DATATYPE, ids=[d for d, _ in EVERY_DATATYPE])
def test_every_datatype_round_trips(client: Any, datatype: str, array: np.ndarray) -> None:
    result = client.infer("echo", [tensor("t", array, datatype)], request_id=f"id-{datatype}")
    answer = result.get_response()
    assert answer.id == f"id-{datatype}"
    assert answer.model_name == "echo"
    assert answer.model_version == "1.0"
    (out,) = answer.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("t", datatype, list(array.shape))
    back = result.as_numpy("t")
    assert back.shape == array.shape
    assert back.dtype == array.dtype
    assert back.tolist() == array.tolist()


def test_several_inputs_and_the_requested_outputs(client: Any) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"kept"], dtype=np.object_)
    c = np.array([7], dtype=np.int64)
    inputs = [tensor("a", a, "FP32"), tensor("b", b, "BYTES"), tensor("c", c, "INT64")]
    wanted = [triton.InferRequestedOutput("c"), triton.InferRequestedOutput("a")]
    result = client.infer("echo", inputs, outputs=wanted)
    names = [out.name for out in result.get_response().outputs]
    assert names == ["c", "a"]  # in the order asked for; `b` was not asked for
    assert result.as_numpy("a").tolist() == a.tolist()
    assert result.as_numpy("c").tolist() == [7]
    assert result.as_numpy("b") is None


def test_a_named_version(client: Any) -> None:
    x = np.array([1], dtype=np.int8)
    assert client.infer("echo2", [tensor("x", x, "INT8")]).get_response().model_name == "echo2"
    answer = client.infer("echo", [tensor("x", x, "INT8")], model_version="2.0").get_response()
    assert answer.model_version == "2.0"
    assert client.get_model_metadata("echo", "2.0").inputs == []  # 2.0 declares none


@pytest.mark.parametrize(
    ("model", "version", "code", "needle"),
    [
        ("nope", "", "NOT_FOUND", "Model not found: nope"),
        ("echo", "9.9", "NOT_FOUND", "Model version: 9.9 does not exist for model: echo"),
    ],
)
def test_unknown_models_and_versions(
    client: Any, model: str, version: str, code: str, needle: str
) -> None:
    x = np.array([1], dtype=np.int8)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [tensor("x", x, "INT8")], model_version=version)
    assert caught.value.status() == f"StatusCode.{code}"
    assert needle in caught.value.message()


def test_an_output_the_model_does_not_give(client: Any) -> None:
    x = [tensor("x", np.array([1], dtype=np.int8), "INT8")]
    with pytest.raises(InferenceServerException) as caught:
        client.infer("echo", x, outputs=[triton.InferRequestedOutput("nope")])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output 'nope'" in caught.value.message()


@pytest.mark.daemon_errors("PredictionException: input 'fail' refused by the handler")
def test_a_request_the_handler_refuses(client: Any) -> None:
    x = np.array([1], dtype=np.int8)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("echo", [tensor("fail", x, "INT8")])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'fail' refused by the handler" in caught.value.message()


def test_requests_queued_together_are_one_handler_batch(
    server: Server, address: str, client: Any
) -> None:
    """batchSize 4: while the one worker holds a request, four more (each on its own
    connection) wait in the queue, which is then full; they reach the handler as one batch."""
    gate = server.root / "batch-gate"
    hold = np.array([str(gate).encode()], dtype=np.object_)

    def one(n: int) -> tuple[str, list[int], Any]:
        with triton.InferenceServerClient(address) as own:
            x = np.array([n], dtype=np.int32)
            inputs = [tensor("x", x, "INT32")]
            if n < 0:
                inputs.append(tensor("hold", hold, "BYTES"))
            answer = own.infer(
                "batched", inputs, request_id=f"r{n}", parameters={"report_batch": True}
            )
        size = answer.as_numpy("batch_size").tolist()
        return answer.get_response().id, size, answer.as_numpy("x").tolist()

    def queued() -> int:
        described = server.manage("GET", "/models/batched").json()[0]
        return int(described["jobQueueStatus"]["pendingRequests"])

    with ThreadPoolExecutor(5) as pool:
        held = pool.submit(one, -1)
        server.wait_for(Path(f"{gate}.entered").exists)  # the one worker is busy now
        together = [pool.submit(one, n) for n in range(4)]
        server.wait_for(lambda: queued() == 4)
        with pytest.raises(InferenceServerException) as full:  # job_queue_size is 4
            client.infer("batched", [tensor("x", np.array([9], dtype=np.int32), "INT32")])
        assert full.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        gate.write_text("open")
        assert held.result(timeout=60) == ("r-1", [1], [-1])
        results = [future.result(timeout=60) for future in together]
    assert results == [(f"r{n}", [4], [n]) for n in range(4)]


# --- typed contents and malformed requests, with tsctl's own stub ---------------------------


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[Any]:
    from tsctl.proto_gen import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


#: (datatype, contents field, values, the numpy dtype of the raw answer)
TYPED = [
    ("BOOL", "bool_contents", [True, False], bool),
    ("INT8", "int_contents", [-128, 127], np.int8),
    ("INT16", "int_contents", [-32768, 5], np.int16),
    ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.int32),
    ("INT64", "int64_contents", [-(2**63), 1], np.int64),
    ("UINT8", "uint_contents", [0, 255], np.uint8),
    ("UINT16", "uint_contents", [65535, 1], np.uint16),
    ("UINT32", "uint_contents", [2**32 - 1, 0], np.uint32),
    ("UINT64", "uint64_contents", [2**64 - 1, 0], np.uint64),
    ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
    ("FP64", "fp64_contents", [1e-300, 2.0], np.float64),
]


@pytest.mark.parametrize(("datatype", "field", "values", "dtype"), TYPED, ids=[t[0] for t in TYPED])
def test_typed_contents_arrive_as_raw_data(
    stub: Any, datatype: str, field: str, values: list[Any], dtype: Any
) -> None:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="echo", id="typed")
    given = request.inputs.add(name="t", datatype=datatype, shape=[2])
    getattr(given.contents, field).extend(values)
    answer = stub.ModelInfer(request, timeout=60)
    assert answer.id == "typed"
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("t", datatype, [2])]
    assert np.frombuffer(answer.raw_output_contents[0], dtype=dtype).tolist() == values


def test_typed_bytes_contents(stub: Any) -> None:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="echo")
    given = request.inputs.add(name="s", datatype="BYTES", shape=[3])
    given.contents.bytes_contents.extend([b"one", b"", b"\x00three"])
    raw = stub.ModelInfer(request, timeout=60).raw_output_contents[0]
    assert raw == b"\x03\x00\x00\x00one\x00\x00\x00\x00\x06\x00\x00\x00\x00three"


def _infer_request(**fields: Any) -> Any:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    return pb.ModelInferRequest(model_name="echo", **fields)


def _bad_requests() -> list[tuple[str, Any, str]]:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor
    contents = pb.InferTensorContents
    return [
        (
            "raw size",
            _infer_request(
                inputs=[tensor(name="x", datatype="FP32", shape=[2])],
                raw_input_contents=[b"\x00" * 7],
            ),
            "input 'x': shape [2] of FP32 takes 8 bytes, got 7",
        ),
        (
            "raw count",
            _infer_request(
                inputs=[tensor(name="x", datatype="INT8", shape=[1])] * 2,
                raw_input_contents=[b"\x00"],
            ),
            "raw_input_contents has 1 entries for 2 inputs",
        ),
        (
            "datatype",
            _infer_request(
                inputs=[tensor(name="x", datatype="FP8", shape=[1])], raw_input_contents=[b"\x00"]
            ),
            "input 'x': unknown datatype 'FP8'",
        ),
        (
            "typed count",
            _infer_request(
                inputs=[
                    tensor(
                        name="x", datatype="INT32", shape=[3], contents=contents(int_contents=[1])
                    )
                ]
            ),
            "input 'x': shape [3] takes 3 elements, contents has 1",
        ),
        (
            "typed field",
            _infer_request(
                inputs=[
                    tensor(
                        name="x", datatype="INT32", shape=[1], contents=contents(fp32_contents=[1])
                    )
                ]
            ),
            "input 'x': datatype INT32 cannot be sent in fp32_contents",
        ),
        (
            "typed range",
            _infer_request(
                inputs=[
                    tensor(
                        name="x", datatype="INT8", shape=[1], contents=contents(int_contents=[300])
                    )
                ]
            ),
            "input 'x': a value does not fit datatype INT8",
        ),
        (
            "negative shape",
            _infer_request(
                inputs=[
                    tensor(
                        name="x", datatype="INT32", shape=[-1], contents=contents(int_contents=[1])
                    )
                ]
            ),
            "input 'x': shape [-1] has a negative dimension",
        ),
        (
            "typed fp16",
            _infer_request(inputs=[tensor(name="x", datatype="FP16", shape=[0])]),
            "input 'x': datatype FP16 has no typed contents: send raw contents",
        ),
    ]


@pytest.mark.parametrize("case", range(8))
def test_malformed_requests_are_invalid_argument(stub: Any, case: int) -> None:
    _, request, needle = _bad_requests()[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (caught.value.details() or "")


# --- kserve's client, in its own process ------------------------------------------------------

KSERVE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def main(url):
        client = InferenceGRPCClient(url, timeout=60)
        found = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready("echo"),
            "unknown_ready": await client.is_model_ready("nope"),
        }
        x = InferInput("x", [2, 2], "FP32")
        x.set_data_from_numpy(np.array([[1.0, 2.0], [3.0, 4.5]], dtype=np.float32))
        s = InferInput("s", [2], "BYTES")
        s.set_data_from_numpy(np.array([b"ab", b"c"], dtype=np.object_))
        request = InferRequest("echo", infer_inputs=[x, s], request_id="k-1")
        answer = await client.infer(request)
        found["id"] = answer.id
        found["outputs"] = {
            out.name: [out.datatype, out.shape, out.as_numpy().tolist()]
            for out in answer.outputs
        }
        typed = InferInput("i", [3], "INT32", data=[1, -2, 3])
        answer = await client.infer(InferRequest("echo", infer_inputs=[typed]))
        found["typed"] = answer.outputs[0].as_numpy().tolist()
        try:
            await client.infer(InferRequest("nope", infer_inputs=[typed]))
        except Exception as exc:
            found["error"] = str(exc)
        await client.close()
        print(json.dumps(found, default=lambda b: b.decode()))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_kserve_grpc_client(address: str, tmp_path: Path) -> None:
    script = tmp_path / "kserve_client.py"
    script.write_text(KSERVE_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["live"] is True
    assert found["ready"] is True
    assert found["model_ready"] is True
    assert found["unknown_ready"] is False
    assert found["id"] == "k-1"
    assert found["outputs"] == {
        "x": ["FP32", [2, 2], [[1.0, 2.0], [3.0, 4.5]]],
        "s": ["BYTES", [2], ["ab", "c"]],
    }
    assert found["typed"] == [1, -2, 3]
    assert "Model not found: nope" in found["error"]


# --- protobuf modules side by side ------------------------------------------------------------


def test_tsctl_module_loads_beside_tritonclient_and_kserve() -> None:
    """tsctl's generated module keeps its own descriptor pool: tritonclient's (or kserve's)
    `inference` package loads beside it, in either order, and the messages are wire-equal."""
    script = textwrap.dedent(
        """
        import sys
        first = sys.argv[1]
        if first == "tsctl":
            from tsctl.proto_gen import grpc_predict_v2_pb2 as ours
        from tritonclient.grpc import service_pb2 as triton
        if first != "tsctl":
            from tsctl.proto_gen import grpc_predict_v2_pb2 as ours
        request = ours.ModelInferRequest(model_name="m", id="i", raw_input_contents=[b"ab"])
        request.inputs.add(name="x", datatype="INT8", shape=[2])
        request.parameters["p"].double_param = 0.5
        theirs = triton.ModelInferRequest.FromString(request.SerializeToString())
        assert theirs.inputs[0].shape == [2] and theirs.parameters["p"].double_param == 0.5
        assert ours.ModelInferRequest.FromString(theirs.SerializeToString()) == request
        print("ok")
        """
    )
    for first in ("tsctl", "tritonclient"):
        done = subprocess.run(
            [sys.executable, "-c", script, first], capture_output=True, text=True, check=False
        )
        assert done.stdout.strip() == "ok", done.stderr


def test_wire_compatible_with_kserve_and_triton() -> None:
    """Every message and field of tsctl's proto has the name, number and type KServe's
    `grpc_predict_v2.proto` gives it (its two extra InferParameter fields are Triton's)."""
    script = textwrap.dedent(
        """
        import json, sys
        from google.protobuf import descriptor_pb2
        if sys.argv[1] == "kserve":
            from kserve.protocol.grpc import grpc_predict_v2_pb2 as module
        elif sys.argv[1] == "triton":
            from tritonclient.grpc import service_pb2 as module
        else:
            from tsctl.proto_gen import grpc_predict_v2_pb2 as module
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        found = {}
        def walk(prefix, messages):
            for message in messages:
                name = prefix + message.name
                found[name] = {
                    f.name: [f.number, f.type, f.label, f.type_name.split(".")[-1]]
                    for f in message.field
                }
                walk(name + ".", message.nested_type)
        walk("", proto.message_type)
        for service in proto.service:
            for method in service.method:
                found[service.name + "/" + method.name] = [method.input_type, method.output_type]
        print(json.dumps(found))
        """
    )

    def shape(which: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", script, which], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    ours, kserve, triton_found = shape("tsctl"), shape("kserve"), shape("triton")
    extra = {"double_param", "uint64_param"}
    for name, fields in ours.items():
        if name == "InferParameter":
            assert {k: v for k, v in fields.items() if k not in extra} == kserve[name]
            assert fields == triton_found[name]
            continue
        assert fields == kserve[name], name
        if isinstance(fields, dict):  # Triton's messages hold these fields, and sometimes more
            assert fields.items() <= triton_found[name].items(), name
        else:
            assert fields == triton_found[name], name
    # kserve's file also has the model repository extension (load/unload), which tsctl
    # leaves to its management API: a client calling it gets UNIMPLEMENTED
    assert set(kserve) - set(ours) == {
        "GRPCInferenceService/RepositoryModelLoad",
        "GRPCInferenceService/RepositoryModelUnload",
        "RepositoryModelLoadRequest",
        "RepositoryModelLoadResponse",
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse",
    }


# --- readiness while a start-up model loads ---------------------------------------------------


def test_not_ready_until_the_startup_model_serves(tmp_path: Path) -> None:
    """A start-up model whose `initialize` waits for a gate file: live and not ready until its
    worker is up, then ready (the daemon's gRPC ports listen before the models load)."""
    srv = Server(tmp_path)
    gate = tmp_path / "gate"
    make_archive(srv.store, "gated", "gated", config={"gate": str(gate)})
    starting = _start_in_background(srv, "gated.mar")
    try:
        info = _wait_for_pid_file(srv, starting)
        with triton.InferenceServerClient(info.grpc_oip_address) as probe:
            assert probe.is_server_live()
            assert not probe.is_server_ready()
            assert not probe.is_model_ready("gated")
            gate.write_text("open")
            assert starting.wait(timeout=120) == 0
            assert probe.is_server_ready()
            assert probe.is_model_ready("gated")
    finally:
        gate.write_text("open")
        starting.wait(timeout=120)
        srv.stop()


def _start_in_background(srv: Server, *models: str) -> subprocess.Popen[bytes]:
    """`tsctl serve start` for `srv`, not waited for (it returns once the models serve)."""
    srv.store.mkdir(parents=True, exist_ok=True)
    srv.watch_logs()
    props = {
        "inference_address": "http://127.0.0.1:0",
        "management_address": "http://127.0.0.1:0",
        "metrics_address": "http://127.0.0.1:0",
        "grpc_inference_port": 0,
        "grpc_management_port": 0,
        "grpc_oip_port": 0,
        "default_workers_per_model": 1,
    }
    config = srv.root / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    args = [
        *("serve", "start", "--ncs", "--disable-token-auth"),
        *("--model-store", str(srv.store), "--ts-config", str(config)),
        *("--state-dir", str(srv.state_dir), "--log-dir", str(srv.log_dir)),
        *("--models", ",".join(models)),
    ]
    return subprocess.Popen(
        [str(BIN / "python"), "-m", "tsctl", *args],
        cwd=srv.root,
        env={**os.environ, "TSCTL_CONSOLE_LOG": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_pid_file(srv: Server, starting: subprocess.Popen[bytes]) -> pidfile.PidInfo:
    """The daemon's record, written once its APIs listen (before its models load)."""
    found: list[pidfile.PidInfo] = []

    def written() -> bool:
        assert starting.poll() is None, "serve start ended before the gate opened"
        info = pidfile.read(pidfile.pid_path(srv.state_dir))
        if info is not None and info.grpc_oip_address:
            found.append(info)
        return bool(found)

    srv.wait_for(written, timeout=60)
    return found[0]


# --- where the port is recorded, TLS, tokens, and off with enable_grpc=false --------------------


def test_serve_status_names_the_oip_port(server: Server, address: str) -> None:
    status = server.tsctl("serve", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["grpc_oip_address"] == address
    table = server.tsctl("serve", "status")
    assert f"OIP {address}" in table.stdout


def test_tls_and_tokens(tmp_path: Path) -> None:
    """With `enable_grpc_ssl` the OIP port speaks TLS (recorded as https://); with token
    authorization on, probes need no token, metadata and inference the inference key."""
    from tests.e2e.test_tls import make_pki, read_key

    pki = make_pki(tmp_path / "pki")
    props = {"private_key_file": pki.key, "certificate_file": pki.cert, "enable_grpc_ssl": "true"}
    srv = Server(tmp_path / "srv", properties=props)
    make_archive(srv.store, "echo", "oip_echo")
    srv.start("echo.mar", auth=True)
    try:
        assert srv.info is not None
        recorded = srv.info.grpc_oip_address
        assert recorded.startswith("https://127.0.0.1:")
        url = recorded.removeprefix("https://")
        with triton.InferenceServerClient(url, ssl=True, root_certificates=str(pki.ca)) as secure:
            assert secure.is_server_live()
            assert secure.is_server_ready()
            assert secure.is_model_ready("echo")
            x = [tensor("x", np.array([3], dtype=np.int16), "INT16")]
            for call in (
                lambda: secure.infer("echo", x),
                secure.get_server_metadata,
                lambda: secure.get_model_metadata("echo"),
            ):
                with pytest.raises(InferenceServerException) as caught:
                    call()
                assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
                assert "Token Authorization failed" in caught.value.message()
            token = {"authorization": f"Bearer {read_key(srv, 'inference')}"}
            assert secure.infer("echo", x, headers=token).as_numpy("x").tolist() == [3]
            assert secure.get_server_metadata(headers=token).name == "tsctl"
    finally:
        srv.stop()


def test_enable_grpc_false_leaves_the_oip_port_closed(tmp_path: Path) -> None:
    srv = Server(tmp_path, properties={"enable_grpc": "false"})
    srv.start()
    try:
        assert srv.info is not None
        assert srv.info.grpc_oip_address == ""
    finally:
        srv.stop()


def test_every_oip_method_wears_the_error_funnel() -> None:
    """Checked in a child process: the servicer's module imports tsctl's TorchServe protos,
    which would clash with the TorchServe stubs other test modules compile into this one."""
    script = textwrap.dedent(
        """
        from tsctl.proto_gen import grpc_predict_v2_pb2_grpc as pb_grpc
        from tsctl.server.api.grpc_errors import is_funnelled
        from tsctl.server.api.grpc_oip import OipService

        base = pb_grpc.GRPCInferenceServiceServicer
        rpcs = [n for n in vars(base) if not n.startswith("_")]
        assert len(rpcs) == 6, rpcs
        print([n for n in rpcs if not is_funnelled(getattr(OipService, n))])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
