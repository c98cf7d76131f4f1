"""The same archives on the real TorchServe 0.12 and on tsctl: the same requests, the same answers.

One set of archives is made with the real torch-model-archiver 0.12 from the handler corpus of
tests/e2e/test_ts_compat.py (tests/fixtures/ts_handlers) and tests/e2e/test_ts_handlers.py
(tests/fixtures/ts_models),
and served by one TorchServe (from its own venv: `$TSCTL_TS_VENV`, default /work/ts-venv, with
Java 17) and one tsctl daemon for the whole module. Each case sends byte-identical requests to
both and compares the status, the handler-set reason phrase and headers, TorchServe's fixed
headers, and the answer (JSON with floats to a relative 1e-5, anything else byte for byte).

Where tsctl differs on purpose (docs/compatibility.md) only what must be equal is compared: a
handler error's status and type but not its message (TorchServe says "Prediction failed"), and
a JSON answer may carry `Content-Type: application/json` where TorchServe sends none.
The differences it documents are asserted as such (`test_documented_differences` and the gRPC
metadata test).

TorchServe's vision handlers import torchvision, which its venv lacks (it does not import
beside this CPU torch): when TorchServe cannot load a model for that reason, that model's cases
are skipped with TorchServe's error. Without the venv or `java` the whole module is skipped.

    .venv/bin/pytest tests/e2e/test_torchserve_parity.py -q
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.e2e.test_ts_compat import MICRO_BATCH, make_models
from tests.e2e.test_ts_compat import archive as archive_handler
from tests.e2e.test_ts_compat import build_archives as build_compat_archives
from tests.fixtures.ts_models.glyphs import digit_set
from tests.support.cli import BIN
from tests.support.daemon import Server
from tests.support.torchserve import (
    ModelLoadFailed,
    Reply,
    TorchServe,
    call,
    unavailable,
    venv_from_environment,
)
from tests.support.ts_handlers import TS_MODELS, boxes_image, encode, multipart, solid
from tests.support.ts_handlers import build_archives as build_default_archives

pytestmark = pytest.mark.slow

#: models whose handlers are TorchServe's vision handlers (they need torchvision there)
VISION = ("colours", "detector", "segmenter", "digits")
#: each model's archive in the store (the status handler also as a tgz and a directory)
ARCHIVES = {
    **{name: f"{name}.mar" for name in ("eager", "imports", "status", "streaming", "micro")},
    "status_tgz": "status_tgz.tar.gz",
    "status_dir": "status_dir",
    **{name: f"{name}.mar" for name in ("sentiment", *VISION)},
}
#: headers TorchServe sets on every answer and tsctl keeps (docs/compatibility.md)
FIXED_HEADERS = ("cache-control", "pragma", "expires")
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


# -- the archives -----------------------------------------------------------------------------


def build_handler_archives(store: Path, work: Path) -> None:
    """tests/e2e/test_ts_compat.py's archives, plus its status handler as a tgz and a folder."""
    build_compat_archives(store, work, make_models())
    archive_handler(store, "status_tgz", "status_handler.py", "--archive-format", "tgz")
    archive_handler(store, "status_dir", "status_handler.py", "--archive-format", "no-archive")


def build_default_handler_archives(store: Path, work: Path) -> None:
    """tests/e2e/test_ts_handlers.py's archives, from tests/fixtures/ts_models/build.py's models."""
    built = work / "built"
    built.mkdir()
    subprocess.run([sys.executable, str(TS_MODELS / "build.py"), str(built)], check=True)
    build_default_archives(store, built)


# -- the two servers --------------------------------------------------------------------------


@dataclass
class Pair:
    """TorchServe and tsctl serving the same store; `failed`: what TorchServe could not load."""

    torchserve: TorchServe
    tsctl: Server
    failed: dict[str, str] = field(default_factory=dict)

    def need(self, model: str) -> None:
        """Skip when TorchServe could not load `model` for want of torchvision; fail otherwise."""
        reason = self.failed.get(model)
        if reason is None:
            return
        if "torchvision" in reason:
            pytest.skip(f"TorchServe cannot load {model!r} here: {reason}")
        pytest.fail(f"TorchServe could not load {model!r}: {reason}")

    def both(self, method: str, path: str, body: bytes | str, headers: dict[str, str]) -> Any:
        """The same request to TorchServe, then to tsctl: (TorchServe's reply, tsctl's)."""
        return (
            call(self.torchserve.inference, method, path, body, headers),
            call(self.tsctl.inference, method, path, body, headers),
        )


@pytest.fixture(scope="module")
def ts_venv() -> Path:
    venv = venv_from_environment()
    reason = unavailable(venv)
    if reason is not None:
        pytest.skip(reason)
    assert (BIN / "torch-model-archiver").exists(), "torch-model-archiver is a dev dependency"
    return venv


@pytest.fixture(scope="module")
def pair(ts_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("parity")
    server = Server(root)
    work = root / "work"
    work.mkdir()
    server.store.mkdir()
    build_handler_archives(server.store, work)
    build_default_handler_archives(server.store, work)
    (root / "torchserve").mkdir()
    torchserve = TorchServe(ts_venv, root / "torchserve", server.store)
    both = Pair(torchserve, server)
    try:
        torchserve.start(*ARCHIVES.values())
        for name in ARCHIVES:
            try:
                torchserve.wait_loaded(name)
            except ModelLoadFailed as failure:
                both.failed[name] = failure.reason
                torchserve.unregister(name)  # or TorchServe restarts its worker forever
        server.start(*(path for name, path in ARCHIVES.items() if name not in both.failed))
        yield both
    finally:
        torchserve.stop()
        server.stop()  # a no-op when it never started


# -- comparing ------------------------------------------------------------------------------


def same_json(ours: Any, theirs: Any, where: str = "answer") -> None:
    """Equal JSON values, floats to a relative 1e-5 (dict key order included)."""
    numbers = (int, float)
    if isinstance(theirs, float) or (isinstance(ours, float) and isinstance(theirs, numbers)):
        assert isinstance(ours, numbers) and not isinstance(ours, bool), (where, ours, theirs)
        assert math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-6), (where, ours, theirs)
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), (where, ours, theirs)
        for key, value in theirs.items():
            same_json(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (mine, value) in enumerate(zip(ours, theirs, strict=True)):
            same_json(mine, value, f"{where}[{i}]")
    else:
        assert ours == theirs, (where, ours, theirs)


def masked(value: Any, request_id: str) -> Any:
    """`value` with the request's own id (random per server) replaced by a marker."""
    if isinstance(value, dict):
        return {key: masked(item, request_id) for key, item in value.items()}
    if isinstance(value, list):
        return [masked(item, request_id) for item in value]
    return "<x-request-id>" if value == request_id else value


def parsed(reply: Reply) -> Any:
    """The reply's JSON with its request id masked, or None when it is not JSON."""
    try:
        return masked(reply.json(), reply.headers.get("x-request-id", ""))
    except ValueError:
        return None


def assert_same(theirs: Reply, ours: Reply, handler_headers: tuple[str, ...] = ()) -> None:
    """tsctl's reply `ours` answers as TorchServe's `theirs` does (see the module docstring)."""
    assert ours.status == theirs.status, (theirs.status, theirs.body, ours.status, ours.body)
    for name in (*FIXED_HEADERS, *handler_headers):
        assert ours.headers.get(name) == theirs.headers.get(name), name
    assert "x-request-id" in theirs.headers and "x-request-id" in ours.headers
    if "content-type" in theirs.headers:
        assert ours.headers.get("content-type") == theirs.headers["content-type"]
    answer = parsed(theirs)
    if answer is None:
        assert ours.body == theirs.body
        return
    if isinstance(answer, dict) and answer.get("message") == "Prediction failed":
        # a handler error: tsctl gives the handler's own message (docs/compatibility.md)
        mine = parsed(ours)
        assert isinstance(mine, dict), ours.body
        assert (mine["code"], mine["type"]) == (answer["code"], answer["type"]), mine
        assert mine["message"] and mine["message"] != "Prediction failed"
        return
    if "content-type" not in theirs.headers:
        assert ours.headers.get("content-type") in (None, "application/json")
    same_json(parsed(ours), answer)


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request, sent to both servers."""

    model: str
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""  # default: /predictions/MODEL
    handler_headers: tuple[str, ...] = ()  # headers the handler sets, compared
    reason: bool = False  # the handler sets the reason phrase: compare it

    @property
    def target(self) -> str:
        return self.path or f"/predictions/{self.model}"


def _image_case(model: str, image: Image.Image, fmt: str = "PNG") -> Case:
    return Case(model, encode(image, fmt), {"Content-Type": f"image/{fmt.lower()}"})


def _multipart_case(model: str, name: str, data: bytes, content_type: str) -> Case:
    body, headers = multipart((name, data, content_type))
    return Case(model, body, headers)


def _segments() -> Image.Image:
    image = Image.new("RGB", (256, 256), (0, 0, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 127, 255), fill=(255, 0, 0))
    draw.rectangle((0, 0, 255, 63), fill=(0, 0, 0))
    return image


#: each case builds its request when it runs (images need PIL)
CASES: dict[str, Callable[[], Case]] = {
    "eager-json": lambda: Case("eager", json.dumps({"data": [1, 2, 3, 4]}), JSON),
    "eager-json-list": lambda: Case("eager", "[0.5, -1, 2, 0]", JSON),
    "eager-octet-stream": lambda: Case(
        "eager", b"[3, 1, -4, 1.5]", {"Content-Type": "application/octet-stream"}
    ),
    "eager-version-path": lambda: Case("eager", "[1, 1, 1, 1]", JSON, "/predictions/eager/1.0"),
    "eager-multipart": lambda: _multipart_case("eager", "data", b"[1, 2, 3, 4]", "text/plain"),
    "eager-form": lambda: Case(
        "eager", "data=%5B1%2C2%2C3%2C4%5D", {"Content-Type": "application/x-www-form-urlencoded"}
    ),
    "eager-handler-error": lambda: Case("eager", b"not json", TEXT),
    "explain-eager": lambda: Case(
        "eager",
        "data=%5B1%2C2%2C3%2C4%5D&target=1",
        {"Content-Type": "application/x-www-form-urlencoded"},
        "/explanations/eager",
    ),
    "explain-eager-version-path": lambda: Case(
        "eager",
        "data=%5B0%2C1%2C0%2C1%5D&target=0",
        {"Content-Type": "application/x-www-form-urlencoded"},
        "/explanations/eager/1.0",
    ),
    "unknown-model": lambda: Case("eager", "[1, 2, 3, 4]", JSON, "/predictions/nope"),
    "unknown-version": lambda: Case("eager", "[1, 2, 3, 4]", JSON, "/predictions/eager/9.9"),
    "status-chosen": lambda: Case(
        "status", "{}", {**JSON, "x-wanted-status": "202"}, "", ("x-seen-header",), True
    ),
    "status-tgz": lambda: Case(
        "status_tgz", "{}", {**JSON, "x-wanted-status": "201"}, "", ("x-seen-header",), True
    ),
    "status-no-archive": lambda: Case(
        "status_dir", "{}", {**JSON, "x-wanted-status": "203"}, "", ("x-seen-header",), True
    ),
    "status-default": lambda: Case("status", "{}", JSON, "", ("x-seen-header",), True),
    "status-prediction-exception": lambda: Case(
        "status", "{}", {**JSON, "x-wanted-status": "raise"}
    ),
    "streaming": lambda: Case("streaming", "go", TEXT, "", ("transfer-encoding",)),
    "sentiment-text": lambda: Case("sentiment", "<b>LOVE</b>!", TEXT),
    "sentiment-raw": lambda: Case("sentiment", "Boring."),
    "sentiment-accents": lambda: Case("sentiment", "Gréat".encode(), TEXT),
    "sentiment-form": lambda: Case(
        "sentiment", "data=good", {"Content-Type": "application/x-www-form-urlencoded"}
    ),
    "sentiment-multipart": lambda: _multipart_case("sentiment", "data", b"awful", "text/plain"),
    "colours-png": lambda: _image_case("colours", solid((230, 20, 10))),
    "colours-jpeg-multipart": lambda: _multipart_case(
        "colours", "data", encode(solid((10, 20, 240)), "JPEG"), "image/jpeg"
    ),
    "colours-not-an-image": lambda: Case("colours", b"not an image", {"Content-Type": "image/png"}),
    "detector-boxes": lambda: _image_case("detector", boxes_image()),
    "segmenter-regions": lambda: _image_case("segmenter", _segments()),
    "digits-glyph": lambda: _image_case("digits", digit_set(seed=2024, per_digit=1)[0][0]),
}


#: the cases whose handler fails on purpose, and the error tsctl's worker logs for it
HANDLER_ERRORS = {
    "eager-handler-error": "JSONDecodeError",
    "status-prediction-exception": "PredictionException: bad thing : 418",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.daemon_errors(HANDLER_ERRORS[name]))
        if name in HANDLER_ERRORS
        else name
        for name in CASES
    ],
)
def test_same_answer(pair: Pair, name: str) -> None:
    case = CASES[name]()
    pair.need(case.model)
    theirs, ours = pair.both("POST", case.target, case.body, case.headers)
    assert_same(theirs, ours, case.handler_headers)
    if case.reason:
        assert ours.reason == theirs.reason


def test_documented_differences(pair: Pair) -> None:
    """Where docs/compatibility.md says tsctl differs, it differs that way and no other."""
    pair.need("status")
    headers = {**JSON, "X-Wanted-Status": "202"}
    theirs, ours = pair.both("POST", "/predictions/status", "{}", headers)
    # context.get_request_header matches names case-insensitively in tsctl, exactly in TS
    assert (theirs.status, ours.status) == (200, 202), (theirs.body, ours.body)
    pair.need("sentiment")
    theirs, ours = pair.both("POST", "/predictions/sentiment", "great film", TEXT)
    # a token (or bigram) missing from a plain-dict vocabulary: <unk> in tsctl, KeyError in TS
    assert (theirs.status, ours.status) == (503, 200), (theirs.body, ours.body)


def test_status_handler_sees_the_request_id(pair: Pair) -> None:
    """The handler's `context.get_request_id` is the answer's `x-request-id`, on both."""
    pair.need("status")
    for reply in pair.both("POST", "/predictions/status", "{}", JSON):
        assert reply.status == 200, reply.body
        assert reply.json()["request_id"] == reply.headers["x-request-id"]


def test_module_handler_imports_the_same_ts_names(pair: Pair) -> None:
    pair.need("imports")
    theirs, ours = pair.both("POST", "/predictions/imports", '{"x": 1}', JSON)
    assert (theirs.status, ours.status) == (200, 200), (theirs.body, ours.body)
    mine, answer = ours.json(), theirs.json()
    assert (mine.pop("from_tsctl"), answer.pop("from_tsctl")) == (True, False)
    same_json(mine, answer)


def test_micro_batching_answers_the_same(pair: Pair) -> None:
    """A whole batch at once (TorchServe waits maxBatchDelay, 10 s, for a partial one)."""
    pair.need("micro")
    inputs = [[float(i), float(i + 1), float(-i)] for i in range(MICRO_BATCH)]
    replies: dict[tuple[str, int], Reply] = {}

    def send(server: str, address: str, i: int) -> None:
        body = json.dumps({"data": inputs[i]})
        replies[server, i] = call(address, "POST", "/predictions/micro", body, JSON)

    threads = [
        threading.Thread(target=send, args=(server, address, i))
        for server, address in (("ts", pair.torchserve.inference), ("us", pair.tsctl.inference))
        for i in range(MICRO_BATCH)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(MICRO_BATCH):
        theirs, ours = replies["ts", i], replies["us", i]
        assert (theirs.status, ours.status) == (200, 200), (theirs.body, ours.body)
        same_json(ours.json()["output"], theirs.json()["output"], f"request {i}")
    # one batch of 6 on TorchServe, cut into micro-batches 0, 1, 2 of two requests each
    indexes = sorted(replies["ts", i].json()["micro_batch"] for i in range(MICRO_BATCH))
    assert indexes == [0, 0, 1, 1, 2, 2]


# -- management: describing a model -----------------------------------------------------------


def described(pair: Pair, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`GET /models/MODEL?customized=true` on both: (TorchServe's description, tsctl's)."""
    path = f"/models/{model}?customized=true"
    theirs = call(pair.torchserve.management, "GET", path)
    ours = call(pair.tsctl.management, "GET", path)
    assert (theirs.status, ours.status) == (200, 200), (theirs.body, ours.body)
    [their_doc], [our_doc] = theirs.json(), ours.json()
    return their_doc, our_doc


def test_describe_gives_the_same_settings(pair: Pair) -> None:
    theirs, ours = described(pair, "eager")
    for key in (
        "modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers",
        "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout", "loadedAtStartup",
        "jobQueueStatus",
    ):  # fmt: skip
        assert ours[key] == theirs[key], key  # by value: 100.0 == 100 here
    [their_worker], [our_worker] = theirs["workers"], ours["workers"]
    assert list(our_worker) == list(their_worker)
    for key in ("id", "status", "gpu", "gpuUsage"):
        assert our_worker[key] == their_worker[key], key


def test_describe_customized_metadata_is_an_object(pair: Pair) -> None:
    theirs, ours = described(pair, "eager")
    assert isinstance(theirs["customizedMetadata"], dict)
    same_json(ours["customizedMetadata"], theirs["customizedMetadata"])


def test_describe_numbers_are_integers(pair: Pair) -> None:
    theirs, ours = described(pair, "eager")
    for key in theirs.keys() & ours.keys():  # the missing ones are the next test's
        assert type(ours[key]) is type(theirs[key]), (key, ours[key], theirs[key])


def test_describe_has_the_same_fields(pair: Pair) -> None:
    theirs, ours = described(pair, "eager")
    assert list(ours) == list(theirs)


def test_describe_worker_start_time_format(pair: Pair) -> None:
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    theirs, ours = described(pair, "eager")
    assert re.fullmatch(pattern, theirs["workers"][0]["startTime"])
    assert re.fullmatch(pattern, ours["workers"][0]["startTime"])


# -- gRPC -------------------------------------------------------------------------------------


def grpc_both(
    pair: Pair, protos: dict[str, ModuleType], call_grpc: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """`call_grpc(stub)` on TorchServe's gRPC inference API, then on tsctl's: each side's
    result, or the `grpc.RpcError` it raised."""
    import grpc

    inference_pb2_grpc = protos["inference_pb2_grpc"]  # TorchServe's generated client

    assert pair.tsctl.info is not None
    results = []
    for address in (pair.torchserve.grpc_inference, pair.tsctl.info.grpc_inference_address):
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            try:
                results.append(call_grpc(stub))
            except grpc.RpcError as error:
                results.append(error)
    return results[0], results[1]


def predictions(protos: dict[str, ModuleType], model: str, **inputs: bytes) -> Any:
    return protos["inference_pb2"].PredictionsRequest(model_name=model, input=inputs)


def test_grpc_predictions_answer_the_same(pair: Pair, ts_protos: dict[str, ModuleType]) -> None:
    pair.need("eager")
    request = predictions(ts_protos, "eager", data=b"[1, 2, 3, 4]")
    theirs, ours = grpc_both(pair, ts_protos, lambda stub: stub.Predictions(request, timeout=60))
    same_json(json.loads(ours.prediction), json.loads(theirs.prediction))


def grpc_handler_error(pair: Pair, ts_protos: dict[str, ModuleType]) -> tuple[Any, Any]:
    """A handler error over gRPC (the eager handler cannot parse its input) on both."""
    import grpc

    pair.need("eager")
    request = predictions(ts_protos, "eager", data=b"not json")
    theirs, ours = grpc_both(pair, ts_protos, lambda stub: stub.Predictions(request, timeout=60))
    assert isinstance(theirs, grpc.RpcError) and isinstance(ours, grpc.RpcError)
    return theirs, ours


@pytest.mark.daemon_errors("JSONDecodeError")
def test_grpc_handler_error_fails_on_both(pair: Pair, ts_protos: dict[str, ModuleType]) -> None:
    """The details differ on purpose: "Prediction failed" there, the handler's error here."""
    theirs, ours = grpc_handler_error(pair, ts_protos)
    assert theirs.details().startswith("Prediction failed")
    assert ours.details().startswith("JSONDecodeError: ")


@pytest.mark.daemon_errors("JSONDecodeError")
def test_grpc_handler_error_has_the_same_code(pair: Pair, ts_protos: dict[str, ModuleType]) -> None:
    theirs, ours = grpc_handler_error(pair, ts_protos)
    assert ours.code() == theirs.code()


def test_grpc_stream_predictions_send_the_same_steps(
    pair: Pair, ts_protos: dict[str, ModuleType]
) -> None:
    pair.need("streaming")
    request = predictions(ts_protos, "streaming", body=b"go")
    theirs, ours = grpc_both(
        pair,
        ts_protos,
        lambda stub: [r.prediction for r in stub.StreamPredictions(request, timeout=60)],
    )
    assert ours == theirs == [b"step0;", b"step1;", b"done"]


@pytest.mark.daemon_errors("PredictionException: bad thing : 418")
def test_grpc_metadata_reaches_the_handler_as_headers(
    pair: Pair, ts_protos: dict[str, ModuleType]
) -> None:
    """Documented difference: tsctl gives a gRPC call's metadata to the handler as request
    headers; TorchServe 0.12 gives it none."""
    import grpc

    pair.need("status")
    request = predictions(ts_protos, "status", body=b"{}")
    metadata = [("x-wanted-status", "raise")]
    theirs, ours = grpc_both(
        pair, ts_protos, lambda stub: stub.Predictions(request, metadata=metadata, timeout=60)
    )
    assert not isinstance(theirs, grpc.RpcError)  # the handler saw no header: a plain answer
    assert isinstance(ours, grpc.RpcError) and ours.details() == "bad thing"
