"""Handlers written for TorchServe 0.12 (`ts.*` imports) in archives made by the real
torch-model-archiver 0.12, served by one tsctl daemon for the whole module; and the pieces
that carry a handler's chosen status (codec, error mapping) and MicroBatching on their own."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.support.cli import BIN
from tests.support.daemon import Server
from tests.support.paths import FIXTURES, ROOT
from tsctl.errors import PredictionFailed, prediction_failed
from tsctl.ipc.codec import decode, encode
from tsctl.ipc.messages import Failure, FailureKind, Kind, Result
from tsctl.server.workers.pool import error_for

HANDLERS = FIXTURES / "ts_handlers"
MICRO_BATCH = 6  # the micro model's batchSize: one batch of 6, cut into slices of 2


def archive(store: Path, name: str, handler: str, *extra: str | Path) -> None:
    """Make `<store>/<name>.mar` with the real torch-model-archiver 0.12 (`handler`: a file of
    tests/ts_handlers, or a built-in handler's name)."""
    made = subprocess.run(
        [
            str(BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
            "--handler", str(HANDLERS / handler) if handler.endswith(".py") else handler,
            "--export-path", str(store), *map(str, extra),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def series(server: Server, name: str, model: str, key: str = "ModelName") -> list[Any]:
    """The (labels, value) of each Prometheus series `name` of `model` on the metrics API."""
    text = server.metrics_text()
    found = re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
    return [(labels, float(v)) for labels, v in found if f'{key}="{model}"' in labels]


def metadata(doc: dict[str, Any]) -> Any:
    """A describe answer's `customizedMetadata`: an object, as in TorchServe 0.12."""
    value = doc["customizedMetadata"]
    assert isinstance(value, dict), value
    return value


def yaml_file(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def make_models() -> dict[str, torch.nn.Module]:
    """The tiny nets the archives hold (weights fixed by a seed)."""
    torch.manual_seed(7)
    from tests.fixtures.ts_handlers.eager_model import TinyLinear

    return {"eager": TinyLinear().eval(), "micro": torch.nn.Linear(3, 2).eval()}


def build_archives(store: Path, work: Path, models: dict[str, torch.nn.Module]) -> None:
    """The TorchServe-style archives of this module, made by the real torch-model-archiver
    (test_torchserve_parity.py serves the same ones on TorchServe)."""
    torch.save(models["eager"].state_dict(), work / "eager_state.pt")
    (work / "index_to_name.json").write_text(json.dumps({"0": "cat", "1": ["n02", "dog"]}))
    archive(
        store, "eager", "eager_handler.py",
        "--model-file", HANDLERS / "eager_model.py",
        "--serialized-file", work / "eager_state.pt",
        "--extra-files", work / "index_to_name.json",
    )  # fmt: skip
    handler_config = {"handler": {"greeting": "hi", "nested": {"x": 1}}}
    archive(
        store, "imports", "imports_handler.py",
        "--config-file", yaml_file(work / "imports.yaml", handler_config),
    )  # fmt: skip
    archive(store, "status", "status_handler.py")
    archive(store, "streaming", "stream_handler.py")
    with warnings.catch_warnings():  # TorchScript is deprecated, and still what .pt holds
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(models["micro"]).save(str(work / "micro.pt"))
    micro_config = {
        "batchSize": MICRO_BATCH,
        "maxBatchDelay": 10000,
        "micro_batching": {
            "micro_batch_size": 2,
            "parallelism": {"preprocess": 2, "inference": 1, "postprocess": 2},
        },
    }
    archive(
        store, "micro", "micro_handler.py",
        "--serialized-file", work / "micro.pt",
        "--config-file", yaml_file(work / "micro.yaml", micro_config),
    )  # fmt: skip


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return make_models()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, torch.nn.Module]
) -> Iterator[Server]:
    # limit_max_image_pixels: TorchServe's key, which reaches handlers as a system property
    properties = {
        "enable_model_api": "true",
        "limit_max_image_pixels": "false",
        # CompatSeen and CompatGauge are not declared in the default metrics configuration
        "model_metrics_auto_detect": "true",
    }
    srv = Server(tmp_path_factory.mktemp("tscompat"), properties=properties)
    work = srv.root / "work"
    work.mkdir()
    srv.store.mkdir()
    build_archives(srv.store, work, models)
    for name, suffix in (("onnx", "onnx"), ("aot", "so")):  # registered by a test: they fail
        (work / f"{name}.{suffix}").write_bytes(b"not a model")
        archive(srv.store, name, "base_handler", "--serialized-file", work / f"{name}.{suffix}")
    srv.start("eager.mar", "imports.mar", "status.mar", "streaming.mar", "micro.mar")
    yield srv
    srv.stop()


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_eager_model_with_base_handler(served: Server, models: dict[str, torch.nn.Module]) -> None:
    response = served.predict("eager", {"data": [1, 2, 3, 4]})
    assert response.status == 200, response.body
    with torch.no_grad():
        expected = models["eager"](torch.tensor([[1.0, 2, 3, 4]]))[0].tolist()
    assert close(response.json(), expected)


@pytest.mark.slow
def test_handler_time_is_recorded(served: Server) -> None:
    assert served.predict("eager", {"data": [0, 0, 0, 0]}).status == 200
    [(_, ms)] = series(served, "HandlerTime", "eager")
    assert ms > 0


@pytest.mark.slow
def test_describe_handle_shows_what_initialize_loaded(served: Server) -> None:
    [doc] = served.manage("GET", "/models/eager?customized=true").json()
    assert metadata(doc) == {
        "mapping": {"0": "cat", "1": "dog"},  # a list label becomes its last item
        "device": "cpu",
        "map_location": "cpu",
        "model_pt_path": "eager_state.pt",
        "initialized": True,
        "model_class": "TinyLinear",
        "training": False,
    }


@pytest.mark.slow
def test_explanations_reach_explain_handle(
    served: Server, models: dict[str, torch.nn.Module]
) -> None:
    form = "data=%5B1%2C2%2C3%2C4%5D&target=1"  # data=[1,2,3,4]&target=1
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    weights = models["eager"].fc.weight.tolist()
    for path in ("/explanations/eager", "/explanations/eager/1.0"):
        explained = served.request("POST", path, form, headers)
        assert explained.status == 200, explained.body
        assert explained.json()["target"] == 1
        assert close(explained.json()["gradient"], weights[1])
    predicted = served.request("POST", "/predictions/eager", form, headers)
    assert predicted.status == 200, predicted.body
    assert isinstance(predicted.json(), list) and len(predicted.json()) == 2


@pytest.mark.slow
def test_explanations_of_an_unknown_model_is_404(served: Server) -> None:
    response = served.request("POST", "/explanations/nope", "[]")
    assert response.status == 404
    assert set(response.json()) == {"code", "type", "message"}


@pytest.mark.slow
def test_module_handler_imports_ts_names(served: Server) -> None:
    response = served.predict("imports", {"x": 1})
    assert response.status == 200, response.body
    assert response.json() == {
        "ts_version": "0.12.0",
        "from_tsctl": True,
        "is_context": True,
        "is_processor": True,
        "initialized_with": "Context",
        "labels": [{"cat": 0.25, "dog": 0.75}],
        "mapping_missing": None,
        "classes": ["BaseHandler"],
        "callables": True,
        "exception": "m : 400",
        "handler_config": {"greeting": "hi", "nested": {"x": 1}},
        "batch_size": 1,
        "limit_max_image_pixels": False,
    }


@pytest.mark.slow
def test_metrics_through_ts_names(served: Server) -> None:
    before = [count for _, count in series(served, "CompatSeen", "imports")] or [0.0]
    assert served.predict("imports", {"x": 1}).status == 200
    [(labels, count)] = series(served, "CompatSeen", "imports")
    assert 'Kind="compat"' in labels
    # each request counts 1 through add_counter and 1 through get_metric().add_or_update()
    assert count == before[0] + 2
    assert [value for _, value in series(served, "CompatGauge", "imports")] == [7.0]


@pytest.mark.slow
def test_request_headers_and_response_status(served: Server) -> None:
    response = served.predict("status", {}, headers={"X-Wanted-Status": "202"})
    assert response.status == 202, response.body
    assert response.headers["x-seen-header"] == "202"
    assert response.json()["wanted"] == "202"
    assert response.json()["request_id"] == response.headers["x-request-id"]


@pytest.mark.slow
@pytest.mark.daemon_errors("PredictionException: bad thing : 418")
def test_prediction_exception_sets_status_and_message(served: Server) -> None:
    response = served.predict("status", {}, headers={"X-Wanted-Status": "raise"})
    assert response.status == 418, response.body
    assert response.json() == {
        "code": 418,
        "type": "InternalServerException",
        "message": "bad thing",
    }
    assert served.predict("status", {}).status == 200  # the worker is still serving


@pytest.mark.slow
@pytest.mark.daemon_errors("PredictionException: no usable code : None")
def test_prediction_exception_without_a_usable_code_is_500(served: Server) -> None:
    response = served.predict("status", {}, headers={"X-Wanted-Status": "no-code"})
    assert response.status == 500, response.body
    assert response.json()["message"] == "no usable code"
    assert served.predict("status", {}).status == 200  # the worker survived it


@pytest.mark.parametrize(
    ("code", "status"),
    [(418, 418), ("404", 404), (None, 500), ("teapot", 500), (0, 500), (-3, 500), (200, 200)],
)
def test_prediction_exception_code_becomes_the_failure_status(code: Any, status: int) -> None:
    from tsctl.worker.service import PredictionException, failure_of

    failure = failure_of(PredictionException("m", code))
    expected = (FailureKind.PREDICTION_EXCEPTION, "m", status)
    assert (failure.kind, failure.message, failure.status) == expected


def test_prediction_exception_subclass_without_init_still_fails_cleanly() -> None:
    from tsctl.worker.service import PredictionException, failure_of

    class Lazy(PredictionException):
        def __init__(self, text: str) -> None:
            Exception.__init__(self, text)  # neither message nor error_code is set

    assert failure_of(Lazy("lazy")) == Failure(FailureKind.PREDICTION_EXCEPTION, "lazy", status=500)


def test_accelerator_out_of_memory_is_507(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reports the kind; the frontend (`error_for`) alone picks the status."""
    from tsctl.worker.service import failure_of

    def answered(exc: Exception) -> int:
        return error_for(failure_of(exc)).http_status

    assert failure_of(MemoryError()).kind is FailureKind.OUT_OF_MEMORY
    assert failure_of(MemoryError()).status == 0  # the worker chooses no status
    assert answered(torch.OutOfMemoryError("CUDA out of memory")) == 507
    assert answered(MemoryError()) == 507
    # torch before 2.5 has only torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")
    assert answered(torch.cuda.OutOfMemoryError("CUDA out of memory")) == 507
    assert answered(RuntimeError("CUDA out of memory")) == 503  # text is not searched


@pytest.mark.slow
@pytest.mark.daemon_errors("PredictionException: bad thing : 418")
def test_prediction_exception_over_grpc(served: Server, ts_protos: dict[str, ModuleType]) -> None:
    import grpc

    # a client generated from TorchServe's own protos (tsctl's generated modules hold the same
    # message names, and one test process cannot load both)
    inference_pb2, inference_pb2_grpc = ts_protos["inference_pb2"], ts_protos["inference_pb2_grpc"]
    assert served.info is not None
    request = inference_pb2.PredictionsRequest(model_name="status", input={"body": b"{}"})
    with grpc.insecure_channel(served.info.grpc_inference_address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predictions(request, metadata=[("x-wanted-status", "raise")], timeout=60)
    # TorchServe's code for a 4xx it has no better match for
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "bad thing"


@pytest.mark.slow
def test_send_intermediate_predict_response_streams(served: Server) -> None:
    response = served.predict("streaming", "go", headers={"Content-Type": "text/plain"})
    assert response.status == 200
    assert response.headers.get("transfer-encoding") == "chunked"
    assert response.body == b"step0;step1;done"


@pytest.mark.slow
def test_micro_batching_answers_in_order(
    served: Server, models: dict[str, torch.nn.Module]
) -> None:
    inputs = [[float(i), float(i + 1), float(-i)] for i in range(MICRO_BATCH)]
    answers: dict[int, Any] = {}

    def send(i: int, body: Any) -> None:
        response = served.predict("micro", body)
        answers[i] = (response.status, response.json())

    # keep the worker busy while a whole batch queues up, so that it runs as one batch
    hold = served.root / "hold"
    hold.mkdir()
    holder = threading.Thread(target=send, args=(-1, {"hold": str(hold)}))
    holder.start()
    served.wait_for(lambda: (hold / "holding").exists())
    threads = [
        threading.Thread(target=send, args=(i, {"data": inputs[i]})) for i in range(MICRO_BATCH)
    ]
    for thread in threads:
        thread.start()
    served.wait_for(
        lambda: (
            [v for _, v in series(served, "tsctl_queue_depth", "micro", "model_name")]
            == [MICRO_BATCH]
        )
    )
    (hold / "release").touch()
    for thread in [holder, *threads]:
        thread.join()
    assert answers.pop(-1)[0] == 200
    with torch.no_grad():
        expected = models["micro"](torch.tensor(inputs)).tolist()
    for i in range(MICRO_BATCH):
        status, answer = answers[i]
        assert status == 200, answer
        assert close(answer["output"], expected[i])
    # one batch of 6 in slices of 2: micro-batches 0, 1 and 2, two answers each
    slices = sorted(answer["micro_batch"] for _, answer in answers.values())
    assert slices == [0, 0, 1, 1, 2, 2]


@pytest.mark.slow
def test_describe_reaches_a_micro_batching_handler(served: Server) -> None:
    [doc] = served.manage("GET", "/models/micro?customized=true").json()
    assert metadata(doc) == {
        "micro_batch_size": 2,
        "preprocess": 2,
        "inference": 1,
        "postprocess": 2,
    }


@pytest.mark.slow
@pytest.mark.daemon_errors(  # the worker's traceback, and the daemon's line naming the model
    r"the ONNX model 'onnx\.onnx' needs the Python package 'onnxruntime'|'aot\.so' is an AOT"
)
@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("onnx", "the ONNX model 'onnx.onnx' needs the Python package 'onnxruntime'"),
        (
            "aot",
            "'aot.so' is an AOT-compiled model, which needs `pt2: {export: {aot_compile: true}}`",
        ),
    ],
)
def test_model_formats_without_support_fail_clearly(
    served: Server, model: str, needle: str
) -> None:
    response = served.manage("POST", f"/models?url={model}.mar&initial_workers=1&synchronous=true")
    assert response.status == 500, response.body  # TorchServe: "Failed to start workers"
    assert needle in response.json()["message"], response.body


@pytest.mark.parametrize(
    "failure",
    [
        Failure(FailureKind.HANDLER_ERROR, "boom", "tb"),
        Failure(FailureKind.PREDICTION_EXCEPTION, "m", "", 418),
    ],
)
def test_failure_status_round_trips(failure: Failure) -> None:
    frame = encode(Result(3, failure=failure))
    meta = json.loads(frame[1])
    assert decode(Kind.RESULT, meta, []) == Result(3, [], failure, 0.0, [])
    legacy = {**meta, "fail": ["HandlerError", "boom", "tb"]}  # a frame without the status
    assert decode(Kind.RESULT, legacy, []).failure == Failure(
        FailureKind.HANDLER_ERROR, "boom", "tb", 0
    )


@pytest.mark.parametrize(
    ("status", "http", "grpc"),
    [
        (0, 503, "UNAVAILABLE"),  # no status chosen: TorchServe's "Prediction failed" 503
        (418, 418, "FAILED_PRECONDITION"),
        (404, 404, "NOT_FOUND"),
        (413, 507, "RESOURCE_EXHAUSTED"),  # TorchServe's frontend turns 413 into 507
        (503, 503, "UNAVAILABLE"),
        (200, 500, "INTERNAL"),  # not an error status: answered as a plain failure
    ],
)
def test_handler_status_maps_like_torchserve(status: int, http: int, grpc: str) -> None:
    error = prediction_failed("bad thing", status)
    assert isinstance(error, PredictionFailed)
    assert (error.http_status, error.grpc_code, error.type_name, error.message) == (
        http, grpc, "InternalServerException", "bad thing"
    )  # fmt: skip
    assert PredictionFailed("x").http_status == 503  # the class itself is untouched


def _micro_batching() -> Any:
    """ts.handler_utils.micro_batching, loaded from its file (it imports no other `ts` module;
    the test process keeps TorchServe's own `ts` importable for other tests)."""
    path = ROOT / "tsctl/worker/compat/ts/handler_utils/micro_batching.py"
    spec = importlib.util.spec_from_file_location("tsctl_test_micro_batching", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Doubler:
    """A handler's three steps: each records which slice it works on; inference fails on a
    negative input, postprocess on a 99."""

    def __init__(self, micro: Any = None) -> None:
        self.micro = micro
        self.seen: list[tuple[int, int | None]] = []
        self.lock = threading.Lock()

    def preprocess(self, data: list[int]) -> list[int]:
        return [x + 1 for x in data]

    def inference(self, data: list[int]) -> list[int]:
        if any(x < 0 for x in data):
            raise ValueError(f"negative input in {data}")
        return [x * 2 for x in data]

    def postprocess(self, data: list[int]) -> list[int]:
        if 200 in data:
            raise KeyError("ninety-nine")
        if self.micro is not None:
            with self.lock:
                self.seen.extend((x, self.micro.get_micro_batch_idx()) for x in data)
        return [x - 1 for x in data]


@pytest.fixture
def micro_module() -> ModuleType:
    return _micro_batching()


def test_micro_batching_keeps_order_and_reports_errors(micro_module: ModuleType) -> None:
    baseline = threading.active_count()
    micro = micro_module.MicroBatching(Doubler(), micro_batch_size=3)
    try:
        micro.parallelism = {"preprocess": 3, "inference": 2, "postprocess": 3}
        assert threading.active_count() == baseline + 8
        for size in (0, 1, 3, 7, 20):
            assert micro.handle(list(range(size))) == [2 * x + 1 for x in range(size)]
        with pytest.raises(ValueError, match="negative input"):
            micro.handle([1, 2, 3, 4, -9, 5, 6])
        with pytest.raises(KeyError, match="ninety-nine"):
            micro.handle([1, 2, 3, 99, 5])
        assert micro.handle([5, 6, 7, 8]) == [11, 13, 15, 17]  # nothing left over
    finally:
        micro.shutdown()
    assert micro.parallelism == {"preprocess": 0, "inference": 0, "postprocess": 0}
    assert threading.active_count() == baseline
    with pytest.raises(RuntimeError, match="shut down"):
        micro.handle([1])


def test_micro_batching_settings(micro_module: ModuleType) -> None:
    micro = micro_module.MicroBatching(Doubler(), parallelism={"inference": 2})
    try:
        assert micro.parallelism == {"preprocess": 1, "inference": 2, "postprocess": 1}
        micro.parallelism = {"postprocess": 3}  # the others keep theirs
        assert micro.parallelism == {"preprocess": 1, "inference": 2, "postprocess": 3}
        micro.parallelism["inference"] = 9  # a copy
        micro.parallelism = {"postprocess": 1, "inference": 1}  # fewer threads
        assert micro.parallelism == {"preprocess": 1, "inference": 1, "postprocess": 1}
        assert micro.handle([1, 2, 3]) == [3, 5, 7]
        assert micro.micro_batch_size == 1
        with pytest.raises(ValueError, match="positive integer, not 0"):
            micro.parallelism = {"inference": 0}
        with pytest.raises(ValueError, match="'training'"):
            micro.parallelism = {"training": 1}
        with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
            micro.micro_batch_size = 0
        assert micro.parallelism == {"preprocess": 1, "inference": 1, "postprocess": 1}
    finally:
        micro.shutdown()


def test_micro_batching_tells_each_step_its_slice(micro_module: ModuleType) -> None:
    doubler = Doubler()
    micro = micro_module.MicroBatching(doubler, micro_batch_size=2, parallelism={"postprocess": 2})
    doubler.micro = micro
    try:
        assert micro.handle([0, 1, 2, 3, 4]) == [1, 3, 5, 7, 9]
    finally:
        micro.shutdown()
    # (value after inference, slice): slices of 2 are numbered from 0
    assert sorted(doubler.seen) == [(2, 0), (4, 0), (6, 1), (8, 1), (10, 2)]
    assert micro.get_micro_batch_idx() is None  # not on a pipeline thread
