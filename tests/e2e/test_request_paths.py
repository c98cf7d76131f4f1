"""The inference port's other request paths, against real daemons over real HTTP, as TorchServe
0.12 routes them: the extra path of `/predictions/{model}/{version}/...` as the handler's
`url_path` header, SageMaker's `/invocations` and `/models/{model}/invoke`, and the legacy
`/{model}[/{version}]/predict`. The handler (tests/fixtures/handlers/path_echo.py) answers
what it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_auth import FAILED, bearer, keys
from tests.e2e.test_serve import assert_error
from tests.support.daemon import Response, Server, make_archive

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}
MODEL_API = {"enable_model_api": "true"}  # registering through the management API


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One start-up model, `echo` (versions 1.0, the default, and 2.0)."""
    srv = Server(tmp_path_factory.mktemp("paths"), properties=MODEL_API)
    make_archive(srv.store, "echo", "path_echo", version="1.0")
    make_archive(srv.store, "echo2", "path_echo", version="2.0")
    make_archive(srv.store, "later", "path_echo")
    # batches of 8: a full batch goes at once, the delay only bounds a batch that never fills
    batching = {"batchSize": 8, "maxBatchDelay": 30000}
    make_archive(srv.store, "batched", "path_echo", config=batching)
    srv.start("echo.mar", "echo=echo2.mar")
    yield srv
    srv.stop()


def seen(reply: Response) -> dict[str, Any]:
    assert reply.status == 200, (reply.status, reply.body)
    doc: dict[str, Any] = reply.json()
    return doc


def post(server: Server, path: str, body: bytes = b'{"prompt": "hi"}', **headers: str) -> Response:
    """POST `body` as JSON; each keyword is a header (`_` in its name as `-`)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    return server.request("POST", path, body, {**JSON, **sent})


# --- url_path


@pytest.mark.parametrize(
    ("path", "url_path", "version"),
    [
        ("/predictions/echo", "", "1.0"),
        ("/predictions/echo/", "", "1.0"),
        ("/predictions/echo/2.0", "", "2.0"),
        ("/predictions/echo/1.0/v1", "v1", "1.0"),
        ("/predictions/echo/1.0/v1/chat/completion", "v1/chat/completion", "1.0"),
        ("/predictions/echo/2.0/v1/completion/", "v1/completion", "2.0"),
        ("/predictions/echo/1.0/a/b/c/d/e", "a/b/c/d/e", "1.0"),
        ("/predictions/echo/1.0/a%20b/c%2Fd", "a b/c/d", "1.0"),
        ("/predictions/echo/1.0/a//b", "a//b", "1.0"),
    ],
)
def test_the_extra_path_reaches_the_handler_as_url_path(
    server: Server, path: str, url_path: str, version: str
) -> None:
    doc = seen(post(server, path))
    assert doc["url_path"] == url_path and doc["version"] == version
    assert doc["explain"] is None and doc["inputs"] == {"body": {"prompt": "hi"}}


def forged(server: Server, path: str) -> Response:
    return server.request("POST", path, b"{}", {**JSON, "url_path": "forged"})


def test_a_url_path_header_of_the_client_is_replaced(server: Server) -> None:
    assert seen(forged(server, "/predictions/echo/1.0/real"))["url_path"] == "real"
    assert seen(forged(server, "/predictions/echo"))["url_path"] == ""


def test_explanations_carry_the_url_path_too(server: Server) -> None:
    doc = seen(post(server, "/explanations/echo/2.0/v1/explain/this"))
    assert doc["url_path"] == "v1/explain/this" and doc["explain"] == "True"
    assert doc["version"] == "2.0"
    assert seen(post(server, "/explanations/echo"))["url_path"] == ""


def test_the_segment_after_the_model_is_always_its_version(server: Server) -> None:
    # as in TorchServe: /predictions/{model}/{extra} names a version, never a url_path
    reply = post(server, "/predictions/echo/v1/chat/completion")
    assert_error(reply, 404, "ModelVersionNotFoundException", "v1", "echo")
    assert_error(post(server, "/predictions/nope/1.0/v1"), 404, "ModelNotFoundException", "nope")


def test_url_paths_of_one_batch_stay_with_their_requests(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    registered = server.manage("POST", "/models?url=batched.mar&initial_workers=1")
    assert registered.status == 200, registered.body
    try:
        paths = [f"/predictions/batched/1.0/route/{i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: seen(post(server, p)), paths))
        assert [a["url_path"] for a in answers] == [f"route/{i}" for i in range(8)]
        assert max(a["batch"] for a in answers) > 1  # some of them shared a batch
    finally:
        assert server.manage("DELETE", "/models/batched").status == 200


# --- SageMaker: /invocations, /models/{model}/invoke, /ping


def test_invocations_go_to_the_only_startup_model(server: Server) -> None:
    doc = seen(
        post(
            server,
            "/invocations",
            X_Amzn_SageMaker_Custom_Attributes="trace=1",
            X_Amzn_SageMaker_Inference_Id="abc",
        )
    )
    assert doc["model"] == "echo" and doc["version"] == "1.0"
    assert doc["inputs"] == {"body": {"prompt": "hi"}}
    assert doc["url_path"] is None  # /invocations adds none, as TorchServe
    assert doc["sagemaker"] == {
        "x-amzn-sagemaker-custom-attributes": "trace=1",
        "x-amzn-sagemaker-inference-id": "abc",
    }


def test_a_model_registered_later_does_not_count_as_a_startup_model(server: Server) -> None:
    registered = server.manage("POST", "/models?url=later.mar&initial_workers=1")
    assert registered.status == 200, registered.body
    try:
        assert seen(post(server, "/invocations/"))["model"] == "echo"
        doc = seen(post(server, "/invocations?model_name=later&x=1&flag"))
        assert doc["model"] == "later"
        # query parameters are inputs here, before the body's parts (TorchServe's order)
        assert doc["inputs"] == {
            "model_name": "later",
            "x": "1",
            "flag": "",
            "body": {"prompt": "hi"},
        }
    finally:
        assert server.manage("DELETE", "/models/later").status == 200


def test_invocations_of_an_unknown_model_name_it(server: Server) -> None:
    reply = post(server, "/invocations?model_name=nope")
    assert_error(reply, 404, "ModelNotFoundException", "Model not found: nope")


def test_models_invoke_is_sagemakers_multi_model_path(server: Server) -> None:
    doc = seen(post(server, "/models/echo/invoke?k=v", X_Amzn_SageMaker_Target_Model="echo.tar.gz"))
    assert doc["model"] == "echo" and doc["version"] == "1.0"
    assert doc["inputs"] == {"k": "v", "body": {"prompt": "hi"}}
    assert doc["sagemaker"] == {"x-amzn-sagemaker-target-model": "echo.tar.gz"}
    assert_error(post(server, "/models/nope/invoke"), 404, "ModelNotFoundException", "nope")
    assert_error(post(server, "/models/echo/call"), 404, "ResourceNotFoundException")


def test_ping_is_healthy(server: Server) -> None:
    reply = server.request("GET", "/ping")
    assert reply.status == 200 and reply.json() == {"status": "Healthy"}


# --- legacy /{model}[/{version}]/predict


def test_legacy_predict_takes_query_parameters_as_inputs(server: Server) -> None:
    doc = seen(server.request("GET", "/echo/predict?data=test&more=a+b%21"))
    assert doc["model"] == "echo" and doc["version"] == "1.0"
    assert doc["inputs"] == {"data": "test", "more": "a b!", "body": ""}
    assert doc["url_path"] is None
    doc = seen(post(server, "/echo/2.0/predict/"))
    assert doc["version"] == "2.0" and doc["inputs"] == {"body": {"prompt": "hi"}}


def test_legacy_predict_errors_name_the_model(server: Server) -> None:
    assert_error(post(server, "/nope/predict"), 404, "ModelNotFoundException", "nope")
    reply = post(server, "/echo/9.9/predict")
    assert_error(reply, 404, "ModelVersionNotFoundException", "9.9", "echo")


@pytest.mark.parametrize(
    "path",
    [
        "/invocations/more",
        "/echo/predict/more",
        "/a/b/c/predict",
        "/ping/predict",
        "/models/predict",
        "/models/echo/predict",
        "/invocations/predict",
        "/predict",
        "/predictions",
        "/predictions//1.0",
    ],
)
def test_other_paths_are_404(server: Server, path: str) -> None:
    assert_error(post(server, path), 404, "ResourceNotFoundException")


@pytest.mark.parametrize("path", ["/invocations", "/models/echo/invoke", "/echo/predict"])
@pytest.mark.parametrize("method", ["OPTIONS", "HEAD"])
def test_options_and_head_are_405_as_on_predictions(server: Server, path: str, method: str) -> None:
    reply = server.request(method, path)
    assert reply.status == 405
    if method == "OPTIONS":
        assert_error(reply, 405, "MethodNotAllowedException")


def test_the_same_request_path_access_log_and_metrics(server: Server) -> None:
    assert seen(post(server, "/invocations?tag=logged")).get("model") == "echo"
    assert '"POST /invocations?tag=logged HTTP/1.1" 200' in server.access_line("tag=logged")
    seen(server.request("GET", "/echo/predict?tag=legacy"))
    assert '"GET /echo/predict?tag=legacy HTTP/1.1" 200' in server.access_line("tag=legacy")
    assert 'model_name="echo"' in server.metrics_text()


# --- several start-up models; limits and authorization


@pytest.fixture(scope="module")
def several(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two start-up models, token authorization on, a 4 KiB request limit."""
    srv = Server(tmp_path_factory.mktemp("several"), properties={"max_request_size": 4096})
    make_archive(srv.store, "first", "path_echo")
    make_archive(srv.store, "second", "path_echo")
    srv.start("first.mar", "second.mar", auth=True)
    yield srv
    srv.stop()


def _token(server: Server) -> dict[str, str]:
    return bearer(keys(server)["inference"]["key"])


def multipart(fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    boundary = "b0undary"
    lines = []
    for name, value in fields.items():
        lines += [f"--{boundary}", f'Content-Disposition: form-data; name="{name}"', "", value]
    body = "\r\n".join([*lines, f"--{boundary}--", ""]).encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_several_models_need_model_name(several: Server) -> None:
    token = _token(several)
    reply = several.request("POST", "/invocations", b"{}", {**JSON, **token})
    assert_error(reply, 400, "BadRequestException", "Parameter model_name is required.")
    doc = seen(several.request("POST", "/invocations?model_name=second", b"{}", {**JSON, **token}))
    assert doc["model"] == "second"


def test_a_form_field_can_name_the_model(several: Server) -> None:
    body, headers = multipart({"model_name": "second", "data": "test"})
    doc = seen(several.request("POST", "/invocations", body, {**headers, **_token(several)}))
    assert doc["model"] == "second" and doc["inputs"] == {"model_name": "second", "data": "test"}
    body, headers = multipart({"model_name": "nope"})
    reply = several.request("POST", "/invocations", body, {**headers, **_token(several)})
    assert_error(reply, 404, "ModelNotFoundException", "nope")


def test_these_paths_need_the_inference_token(several: Server) -> None:
    for path in ("/invocations?model_name=first", "/models/first/invoke", "/first/predict"):
        reply = several.request("POST", path, b"{}", JSON)
        assert_error(reply, 400, "InvalidKeyException", FAILED)
    body, headers = multipart({"model_name": "first"})
    assert_error(several.request("POST", "/invocations", body, headers), 400, "InvalidKeyException")
    assert several.request("GET", "/ping").status == 200  # probes need no token


def test_these_paths_keep_max_request_size(several: Server) -> None:
    big = b'{"x": "' + b"a" * 5000 + b'"}'
    for path in ("/invocations?model_name=first", "/models/first/invoke", "/first/predict"):
        reply = several.request("POST", path, big, {**JSON, **_token(several)})
        assert_error(reply, 413, "RequestEntityTooLargeException", "max_request_size")
    body, headers = multipart({"model_name": "first", "data": "a" * 5000})
    reply = several.request("POST", "/invocations", body, {**headers, **_token(several)})
    assert_error(reply, 413, "RequestEntityTooLargeException", "max_request_size")


def test_no_startup_model_needs_model_name(tmp_path: Path) -> None:
    srv = Server(tmp_path, properties=MODEL_API)
    make_archive(srv.store, "solo", "path_echo")
    srv.start()
    try:
        registered = srv.manage("POST", "/models?url=solo.mar&initial_workers=1")
        assert registered.status == 200, registered.body
        reply = srv.request("POST", "/invocations", b"{}", JSON)
        assert_error(reply, 400, "BadRequestException", "model_name")
        named = srv.request("POST", "/invocations?model_name=solo", b"{}", JSON)
        assert seen(named)["model"] == "solo"
    finally:
        srv.stop()


def test_the_api_description_lists_these_paths(server: Server) -> None:
    paths = seen(server.request("GET", "/api-description"))["paths"]
    for path in (
        "/predictions/{model_name}/{model_version}/{url_path}",
        "/explanations/{model_name}/{model_version}/{url_path}",
        "/invocations",
        "/models/{model_name}/invoke",
        "/{model_name}/predict",
        "/{model_name}/{model_version}/predict",
    ):
        assert "post" in paths[path], path
