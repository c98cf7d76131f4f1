"""gRPC against tsctl with a client generated at test time from TorchServe 0.12's own protos."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.support.daemon import Server, make_archive
from tests.support.grpc_stubs import torchserve_stubs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("grpc"), properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "swiss2", "swiss", version="2.0")
    make_archive(srv.store, "batched", "swiss", config={"batchSize": 8, "maxBatchDelay": 1000})
    make_archive(srv.store, "slow", "swiss", config={"responseTimeout": 1})
    make_archive(srv.store, "pair", "swiss", config={"minWorkers": 2})
    srv.start("swiss.mar", "swiss=swiss2.mar", "batched.mar", "slow.mar", "pair.mar")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stubs(server: Server, ts_protos: dict[str, ModuleType]) -> Iterator[tuple[Any, Any]]:
    with torchserve_stubs(server, ts_protos) as found:
        yield found


def predict(stubs: Any, protos: dict[str, ModuleType], model: str, **inputs: bytes) -> Any:
    request = protos["inference_pb2"].PredictionsRequest(model_name=model, input=inputs)
    return stubs[0].Predictions(request, timeout=60)


def test_ping(stubs: Any) -> None:
    from google.protobuf import empty_pb2

    assert json.loads(stubs[0].Ping(empty_pb2.Empty()).health) == {"status": "Healthy"}


def test_predictions(stubs: Any, ts_protos: dict[str, ModuleType]) -> None:
    answer = json.loads(predict(stubs, ts_protos, "swiss", data=b"\x00\x01", tag=b"t").prediction)
    assert answer["types"] == {"data": "bytearray", "tag": "bytearray"}
    versioned = ts_protos["inference_pb2"].PredictionsRequest(
        model_name="swiss", model_version="2.0", input={"data": b"x"}
    )
    assert json.loads(stubs[0].Predictions(versioned).prediction)["version"] == "2.0"


@pytest.mark.parametrize(
    ("model", "inputs", "code", "needle"),
    [
        ("nope", {"data": b"x"}, grpc.StatusCode.NOT_FOUND, "Model not found: nope"),
        pytest.param(
            "swiss",
            {"body": b'{"action": "raise"}'},
            grpc.StatusCode.UNAVAILABLE,
            "Prediction failed",  # TorchServe's text; the exception is in model_log.log only
            marks=pytest.mark.daemon_errors("ValueError: boom from handler"),
        ),
        ("swiss", {"body": b'{"action": "short"}'}, grpc.StatusCode.UNAVAILABLE, "0 results"),
        pytest.param(
            "slow",
            {"body": b'{"action": "sleep", "seconds": 30}'},
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "response timeout of 1 s",
            marks=pytest.mark.daemon_errors("worker 9000-slow_1.0 overran the response timeout"),
        ),
    ],
)
def test_status_codes(
    stubs: Any,
    ts_protos: dict[str, ModuleType],
    model: str,
    inputs: dict[str, bytes],
    code: grpc.StatusCode,
    needle: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(stubs, ts_protos, model, **inputs)
    assert caught.value.code() == code
    assert needle in caught.value.details()
    predict(stubs, ts_protos, "swiss" if model == "nope" else model, data=b"ok")  # still serves


def test_rest_and_grpc_share_batches(
    server: Server, stubs: Any, ts_protos: dict[str, ModuleType]
) -> None:
    seen: list[list[list[str]]] = []
    marker = server.root / "busy"
    busy = threading.Thread(
        target=server.predict,
        args=("batched", {"action": "sleep", "seconds": 1, "marker": str(marker)}),
    )
    busy.start()
    server.wait_for(marker.exists)  # the worker is busy: what comes next waits in the queue

    def rest() -> None:
        seen.append(server.predict("batched", {"action": "echo"}).json()["batch_keys"])

    def rpc() -> None:
        answer = predict(stubs, ts_protos, "batched", grpc_field=b"1")
        seen.append(json.loads(answer.prediction)["batch_keys"])

    threads = [threading.Thread(target=f) for f in (rest, rpc) * 3]
    for t in threads:
        t.start()
    server.wait_for(
        lambda: (
            server.manage("GET", "/models/batched").json()[0]["jobQueueStatus"]["pendingRequests"]
            == 6
        )
    )
    for t in [busy, *threads]:
        t.join()
    assert len(seen) == 6
    assert all(["body"] in keys and ["grpc_field"] in keys for keys in seen), seen


def test_stream_predictions2_keeps_sequence_ids(
    stubs: Any, ts_protos: dict[str, ModuleType]
) -> None:
    pb = ts_protos["inference_pb2"]
    requests = [
        pb.PredictionsRequest(model_name="swiss", input={"data": b"a"}, sequence_id="s1"),
        pb.PredictionsRequest(model_name="nope", input={"data": b"b"}, sequence_id="s1"),
        pb.PredictionsRequest(model_name="swiss", input={"data": b"c"}, sequence_id="s2"),
    ]
    answers = list(stubs[0].StreamPredictions2(iter(requests), timeout=60))
    assert [a.sequence_id for a in answers] == ["s1", "s1", "s2"]
    assert answers[1].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert json.loads(answers[2].prediction)["types"] == {"data": "bytearray"}


def test_stream_predictions(stubs: Any, ts_protos: dict[str, ModuleType]) -> None:
    request = ts_protos["inference_pb2"].PredictionsRequest(
        model_name="swiss", input={"data": b"a"}
    )
    answers = list(stubs[0].StreamPredictions(request, timeout=60))
    assert len(answers) == 1 and json.loads(answers[0].prediction)["types"] == {"data": "bytearray"}


def test_message_size_follows_max_request_size(
    stubs: Any, ts_protos: dict[str, ModuleType], tmp_path: Path
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(stubs, ts_protos, "swiss", data=b"x" * (10 << 20))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = Server(tmp_path, properties={"max_request_size": 12 << 20, "max_response_size": 12 << 20})
    make_archive(big.store, "swiss", "swiss")
    big.start("swiss.mar")
    try:
        assert big.info is not None
        with grpc.insecure_channel(
            big.info.grpc_inference_address,
            options=[("grpc.max_send_message_length", 12 << 20)],
        ) as channel:
            stub = ts_protos["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
            answer = predict((stub,), ts_protos, "swiss", data=b"x" * (10 << 20))
        assert json.loads(answer.prediction)["values"] == {"data": 10 << 20}
    finally:
        big.stop()


def test_management_rpcs(server: Server, stubs: Any, ts_protos: dict[str, ModuleType]) -> None:
    pb = ts_protos["management_pb2"]
    manage = stubs[1]
    listed = json.loads(manage.ListModels(pb.ListModelsRequest(limit=2)).msg)
    assert listed["nextPageToken"] == "2" and len(listed["models"]) == 2
    described = json.loads(
        manage.DescribeModel(pb.DescribeModelRequest(model_name="swiss", model_version="all")).msg
    )
    assert sorted(d["modelVersion"] for d in described) == ["1.0", "2.0"]
    # TorchServe's `msg`: JSON for list and describe, the plain sentence for the others
    scaled = manage.ScaleWorker(
        pb.ScaleWorkerRequest(model_name="swiss", min_worker=2, synchronous=True)
    ).msg
    assert scaled == "Workers scaled to 2 for model: swiss"
    default = manage.SetDefault(pb.SetDefaultRequest(model_name="swiss", model_version="2.0")).msg
    assert default == 'Default version successfully updated for model "swiss" to "2.0"'
    manage.SetDefault(pb.SetDefaultRequest(model_name="swiss", model_version="1.0"))
    registered = manage.RegisterModel(
        pb.RegisterModelRequest(url="swiss2.mar", model_name="other", synchronous=True)
    ).msg
    assert registered == 'Model "other" Version: 2.0 registered with 1 initial workers'
    gone = manage.UnregisterModel(pb.UnregisterModelRequest(model_name="other")).msg
    assert gone == 'Model "other" unregistered'
    # proto3's 0 is "not given": min_worker 1, max_worker = min_worker (TorchServe's reading)
    assert manage.ScaleWorker(pb.ScaleWorkerRequest(model_name="swiss", synchronous=True)).msg == (
        "Workers scaled to 1 for model: swiss"
    )
    [swiss] = json.loads(manage.DescribeModel(pb.DescribeModelRequest(model_name="swiss")).msg)
    assert (swiss["minWorkers"], swiss["maxWorkers"]) == (1, 1)
    accepted = manage.RegisterModel(pb.RegisterModelRequest(url="swiss2.mar", model_name="later"))
    assert accepted.msg == "Processing worker updates..."  # synchronous is false unless set
    server.wait_for(
        lambda: (
            [w["status"] for w in server.manage("GET", "/models/later").json()[0]["workers"]]
            == ["READY"]
        )
    )
    manage.UnregisterModel(pb.UnregisterModelRequest(model_name="later"))
    negative = pb.RegisterModelRequest(
        url="swiss2.mar", model_name="neg", initial_workers=-1, batch_size=-1, synchronous=True
    )  # read as not given, as TorchServe reads them
    assert manage.RegisterModel(negative).msg.endswith("registered with 1 initial workers")
    manage.UnregisterModel(pb.UnregisterModelRequest(model_name="neg"))
    with pytest.raises(grpc.RpcError) as caught:
        manage.SetDefault(pb.SetDefaultRequest(model_name="swiss", model_version="9.9"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "Model version 9.9 does not exist for model swiss"
    with pytest.raises(grpc.RpcError) as caught:
        manage.DescribeModel(pb.DescribeModelRequest(model_name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        manage.RegisterModel(pb.RegisterModelRequest(url="swiss.mar"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_cli_infer_over_grpc(server: Server) -> None:
    files = [server.root / "a.bin", server.root / "b.bin"]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * 5)
    together = server.tsctl("infer", "swiss", ",".join(map(str, files)), "--grpc")
    assert together.returncode == 0, together.stderr
    assert json.loads(together.stdout)["types"] == {"a.bin": "bytearray", "b.bin": "bytearray"}
    each = server.tsctl("infer", "swiss", ",".join(map(str, files)), "--grpc", "--each")
    assert each.returncode == 0, each.stderr
    assert each.stdout.count('"types"') == 2
    streamed = server.tsctl("infer", "swiss", str(files[0]), "--grpc", "--stream")
    assert json.loads(streamed.stdout)["types"] == {"data": "bytearray"}
    missing = server.tsctl("infer", "nope", str(files[0]), "--grpc")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "tsctl: error: NOT_FOUND: Model not found: nope"
    nowhere = server.tsctl("infer", "swiss", str(files[0]), "--grpc", "--url", "127.0.0.1:9")
    assert nowhere.returncode == 1 and "cannot reach the gRPC server" in nowhere.stderr


def test_cli_models_over_grpc(server: Server) -> None:
    def run(*args: str) -> Any:
        result = server.tsctl("models", *args, "--grpc")
        assert result.returncode == 0, result.stderr
        return result

    listed = json.loads(run("list", "--json").stdout)
    assert {m["modelName"] for m in listed["models"]} >= {"swiss", "batched", "slow"}
    assert (
        "registered with 1 initial workers"
        in run("register", "swiss.mar", "--model-name", "third").stdout
    )
    assert (
        run("scale", "third", "--min-workers", "2").stdout.strip()
        == "Workers scaled to 2 for model: third"
    )
    described = json.loads(run("describe", "third", "--json").stdout)
    assert len(described[0]["workers"]) == 2
    assert "Default version successfully updated" in run("set-default", "third", "1.0").stdout
    assert run("unregister", "third").stdout.strip() == 'Model "third" unregistered'
    missing = server.tsctl("models", "describe", "nope", "--grpc")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "tsctl: error: NOT_FOUND: Model not found: nope"


def test_health_service(server: Server) -> None:
    from tsctl.proto_gen import health_pb2, health_pb2_grpc

    assert server.info is not None
    status = health_pb2.HealthCheckResponse
    with grpc.insecure_channel(server.info.grpc_inference_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> Any:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status

        assert check("") == status.SERVING
        assert check("swiss") == status.SERVING
        assert check("swiss/2.0") == status.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            check("nope")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        server.manage("PUT", "/models/slow?min_worker=0&synchronous=true")
        try:
            assert check("slow") == status.NOT_SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="slow"), timeout=30)
            assert next(watch).status == status.NOT_SERVING
            server.manage("PUT", "/models/slow?min_worker=1&synchronous=true")
            assert next(watch).status == status.SERVING
            watch.cancel()
        finally:
            server.manage("PUT", "/models/slow?min_worker=1&synchronous=true")


@pytest.fixture(scope="module")
def streaming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("stream"))
    make_archive(srv.store, "yielder", "streamer")
    make_archive(srv.store, "sender", "streamer", config={"handler": {"style": "send"}})
    srv.start("yielder.mar", "sender.mar")
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    ("model", "parts"),
    [("yielder", ["part0 ", "part1 ", "part2 "]), ("sender", ["early0 ", "early1 ", "done"])],
)
def test_streaming_handlers(
    streaming: Server, ts_protos: dict[str, ModuleType], model: str, parts: list[str]
) -> None:
    rest = streaming.predict(model, b"x", headers={"Content-Type": "application/octet-stream"})
    assert rest.status == 200
    assert rest.headers.get("transfer-encoding") == "chunked"
    assert rest.body.decode() == "".join(parts)
    assert streaming.info is not None
    with grpc.insecure_channel(streaming.info.grpc_inference_address) as channel:
        stub = ts_protos["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
        request = ts_protos["inference_pb2"].PredictionsRequest(model_name=model, input={"d": b"x"})
        streamed = [m.prediction.decode() for m in stub.StreamPredictions(request, timeout=60)]
        assert streamed == parts  # in order, one message each
        assert stub.Predictions(request, timeout=60).prediction.decode() == parts[-1]


def test_sequences_stick_to_one_worker(stubs: Any, ts_protos: dict[str, ModuleType]) -> None:
    pb = ts_protos["inference_pb2"]
    sequences = [f"seq{i}" for i in range(3)]  # odd, so alternating workers would split them
    requests = [
        pb.PredictionsRequest(model_name="pair", input={"step": str(step).encode()}, sequence_id=s)
        for step in range(3)
        for s in sequences
    ]
    answers = list(stubs[0].StreamPredictions2(iter(requests), timeout=60))
    assert [a.sequence_id for a in answers] == [r.sequence_id for r in requests]
    pids: dict[str, set[int]] = {}
    for answer in answers:
        pids.setdefault(answer.sequence_id, set()).add(json.loads(answer.prediction)["pid"])
    assert all(len(found) == 1 for found in pids.values()), pids
    # without sequence ids the same calls spread over both workers
    plain = [pb.PredictionsRequest(model_name="pair", input={"x": b"1"}) for _ in range(6)]
    spread = {json.loads(a.prediction)["pid"] for a in stubs[0].StreamPredictions2(iter(plain))}
    assert len(spread) == 2
