"""Authorizer plugins in real daemons (issue 17): the API-key example installed through its entry
point (examples/plugins/apikey_authorizer), authorizers from `--plugins-path` chained after it,
over REST (TorchServe's paths, KServe v1 and OIP, management, metrics) and gRPC (TorchServe's
inference and management services, OIP); health checks exempt; token authorization beside them;
an authorizer that raises fails its request alone."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.e2e.test_auth import FAILED, bearer, keys
from tests.e2e.test_serve import assert_error
from tests.support.daemon import Response, Server, make_archive
from tests.support.grpc_stubs import torchserve_stubs
from tests.support.plugins import install_example, write_plugin

pytestmark = pytest.mark.slow

#: the keys, and what each may use (the file holds only their hashes)
KEYS = {"all-models-key": ["*"], "swiss-only-key": ["swiss"]}
ALL, SWISS_ONLY = "all-models-key", "swiss-only-key"
MISSING = "an API key is required: send it in the X-Api-Key header"
INVALID = "the API key is not valid"
NOT_OTHER = "this API key may not use model 'other'"
AUTHORIZER_FAILED = "internal server error: the request could not be authorized"
TOKEN_API_FAILED = FAILED.replace("Authorization", "Authentication", 1)

#: authorizers from a plugins folder, asked after the API-key one (entry points come first)
FOLDER_PLUGINS = '''
import json

from tsctl.plugins import Authorizer, Denied


class Flaky(Authorizer):
    """Raises when asked to (a bug in a plugin)."""

    name = "flaky"

    def authorize(self, request):
        if request.headers.get("x-boom"):
            raise RuntimeError("flaky's secret detail")
        return None


class Mirror(Authorizer):
    """Refuses with what it was told of the request, when asked to."""

    name = "mirror"

    def authorize(self, request):
        if not request.headers.get("x-mirror"):
            return None
        seen = {
            "api": request.api, "method": request.method, "path": request.path,
            "peer": request.peer, "model": request.model, "protocol": request.protocol,
            "mirror": request.headers.get("x-mirror"),
        }
        return Denied(418, json.dumps(seen))


class Tenant(Authorizer):
    """Only tenant acme; a throttled tenant gets 429."""

    name = "tenant"

    def authorize(self, request):
        tenant = request.headers.get("x-tenant", "")
        if tenant == "throttled":
            return Denied(429, "tenant throttled: slow down")
        if tenant != "acme":
            return Denied(403, "only tenant acme may call")
        return None


PLUGINS = [Flaky, Mirror, Tenant]
'''


def keys_file(path: Path) -> Path:
    hashed = {hashlib.sha256(key.encode()).hexdigest(): models for key, models in KEYS.items()}
    path.write_text(json.dumps(hashed))
    return path


def plugin_env(root: Path) -> dict[str, str]:
    """The example installed in a site folder (with its entry point) and its keys file."""
    site = install_example("apikey_authorizer", root / "site")
    return {"PYTHONPATH": str(site), "TSCTL_API_KEYS": str(keys_file(root / "keys.json"))}


def start(root: Path, *, auth: bool = False, flags: tuple[str, ...] = ()) -> Server:
    srv = Server(root, properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "other", "swiss")
    srv.start("swiss.mar", "other.mar", auth=auth, flags=flags, env=plugin_env(root))
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tmp_path_factory.mktemp("apikey"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("chained")
    write_plugin(root / "plugins", "house_rules", FOLDER_PLUGINS)
    srv = start(root, flags=("--plugins-path", str(root / "plugins")))
    yield srv
    srv.stop()


def key(value: str, **more: str) -> dict[str, str]:
    return {"X-Api-Key": value, **more}


def meta(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in headers.items())


def metrics_get(server: Server, headers: dict[str, str]) -> Response:
    """`GET /metrics` on the metrics API."""
    assert server.info is not None
    host, port = server.info.metrics_address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", "/metrics", headers=headers)
        reply = conn.getresponse()
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def error_of(response: Response) -> str:
    """The `{"error": ...}` of a KServe v1 / OIP answer."""
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert set(doc) == {"error"}, doc
    message: str = doc["error"]
    return message


def rpc_fails(call: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=60, **kw)
    return caught.value


@pytest.fixture(scope="module")
def ts_stubs(server: Server, ts_protos: dict[str, ModuleType]) -> Iterator[tuple[Any, Any]]:
    with torchserve_stubs(server, ts_protos) as found:
        yield found


def oip_stub(server: Server) -> tuple[grpc.Channel, Any]:
    from tsctl.proto_gen import grpc_predict_v2_pb2_grpc

    assert server.info is not None and server.info.grpc_oip_address
    channel = grpc.insecure_channel(server.info.grpc_oip_address)
    return channel, grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)


# --- the API-key example alone


def test_rest_predictions_need_a_key_allowed_for_the_model(server: Server) -> None:
    assert server.predict("swiss", {}, headers=key(SWISS_ONLY)).status == 200
    assert server.predict("other", {}, headers=key(ALL)).status == 200
    assert_error(server.predict("swiss", {}), 401, "AccessDeniedException", MISSING)
    wrong = server.predict("swiss", {}, headers=key("not-a-key"))
    assert_error(wrong, 401, "AccessDeniedException", INVALID)
    other = server.predict("other", {}, headers=key(SWISS_ONLY))
    assert_error(other, 403, "AccessDeniedException", NOT_OTHER)
    explained = server.request("POST", "/explanations/other", b"{}", key(SWISS_ONLY))
    assert_error(explained, 403, "AccessDeniedException", NOT_OTHER)


def test_kserve_and_oip_rest_denials_have_their_error_shape(server: Server) -> None:
    v1 = server.request("POST", "/v1/models/other:predict", b'{"instances": []}', key(SWISS_ONLY))
    assert v1.status == 403 and error_of(v1) == NOT_OTHER
    infer = server.request("POST", "/v2/models/other/infer", b"{}")
    assert infer.status == 401 and error_of(infer) == MISSING
    metadata = server.request("GET", "/v2/models/other", headers=key(SWISS_ONLY))
    assert metadata.status == 403 and error_of(metadata) == NOT_OTHER
    listed = server.request("GET", "/v1/models", headers=key(SWISS_ONLY))  # no model: any key
    assert listed.status == 200 and listed.json() == {"models": ["other", "swiss"]}
    assert server.request("GET", "/v2/models/swiss", headers=key(SWISS_ONLY)).status == 200


def test_health_checks_need_no_key(server: Server, ts_stubs: tuple[Any, Any]) -> None:
    from google.protobuf import empty_pb2

    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    assert server.request("GET", "/ping").json() == {"status": "Healthy"}
    assert server.request("GET", "/v2/health/live").json() == {"live": True}
    assert server.request("GET", "/v2/health/ready").json() == {"ready": True}
    assert server.request("GET", "/v2/models/other/ready").status == 200
    assert json.loads(ts_stubs[0].Ping(empty_pb2.Empty(), timeout=60).health) == {
        "status": "Healthy"
    }
    channel, oip = oip_stub(server)
    with channel:
        assert oip.ServerLive(pb.ServerLiveRequest(), timeout=60).live
        assert oip.ServerReady(pb.ServerReadyRequest(), timeout=60).ready
        assert oip.ModelReady(pb.ModelReadyRequest(name="other"), timeout=60).ready
        # a call that is not a health check does ask
        denied = rpc_fails(oip.ServerMetadata, pb.ServerMetadataRequest())
    assert denied.code() == grpc.StatusCode.UNAUTHENTICATED and denied.details() == MISSING


def test_grpc_predictions_through_the_authorizer(
    server: Server, ts_stubs: tuple[Any, Any], ts_protos: dict[str, ModuleType]
) -> None:
    inference = ts_stubs[0]

    def request(model: str) -> Any:
        return ts_protos["inference_pb2"].PredictionsRequest(model_name=model, input={"x": b"1"})

    answer = inference.Predictions(request("swiss"), metadata=meta(key(SWISS_ONLY)), timeout=60)
    assert json.loads(answer.prediction)["types"] == {"x": "bytearray"}
    missing = rpc_fails(inference.Predictions, request("swiss"))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and missing.details() == MISSING
    wrong = rpc_fails(inference.Predictions, request("swiss"), metadata=meta(key("nope")))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and wrong.details() == INVALID
    other = rpc_fails(inference.Predictions, request("other"), metadata=meta(key(SWISS_ONLY)))
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED and other.details() == NOT_OTHER
    streamed = rpc_fails(
        lambda *a, **kw: list(inference.StreamPredictions(*a, **kw)),
        request("other"),
        metadata=meta(key(SWISS_ONLY)),
    )
    assert streamed.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_management_and_oip_through_the_authorizer(
    server: Server, ts_stubs: tuple[Any, Any], ts_protos: dict[str, ModuleType]
) -> None:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    manage, messages = ts_stubs[1], ts_protos["management_pb2"]
    listed = manage.ListModels(messages.ListModelsRequest(), metadata=meta(key(SWISS_ONLY)))
    assert {m["modelName"] for m in json.loads(listed.msg)["models"]} == {"other", "swiss"}
    described = rpc_fails(
        manage.DescribeModel,
        messages.DescribeModelRequest(model_name="other"),
        metadata=meta(key(SWISS_ONLY)),
    )
    assert described.code() == grpc.StatusCode.PERMISSION_DENIED
    assert described.details() == NOT_OTHER
    channel, oip = oip_stub(server)
    with channel:
        infer = pb.ModelInferRequest(model_name="other")
        denied = rpc_fails(oip.ModelInfer, infer, metadata=meta(key(SWISS_ONLY)))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.details() == NOT_OTHER
        metadata = pb.ModelMetadataRequest(name="swiss")
        found = oip.ModelMetadata(metadata, metadata=meta(key(SWISS_ONLY)), timeout=60)
        assert found.name == "swiss"


def test_management_and_metrics_apis_ask_the_authorizer(server: Server) -> None:
    assert_error(server.manage("GET", "/models"), 401, "AccessDeniedException", MISSING)
    listed = server.manage("GET", "/models", headers=key(SWISS_ONLY))
    assert listed.status == 200 and len(listed.json()["models"]) == 2
    described = server.manage("GET", "/models/other", headers=key(SWISS_ONLY))
    assert_error(described, 403, "AccessDeniedException", NOT_OTHER)
    assert server.manage("GET", "/models/other", headers=key(ALL)).status == 200
    assert_error(metrics_get(server, {}), 401, "AccessDeniedException", MISSING)
    metrics = metrics_get(server, key(SWISS_ONLY))
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")


@pytest.mark.daemon_errors(r"start-up failed: plugin apikey: setup failed: ValueError")
def test_a_missing_keys_file_stops_the_start(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    env = plugin_env(tmp_path)
    env["TSCTL_API_KEYS"] = str(tmp_path / "absent.json")
    result = srv.start(expect_ok=False, env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("tsctl: error: ") and "plugin apikey: setup failed" in line, line
    assert "TSCTL_API_KEYS: cannot read" in line and "absent.json" in line, line


# --- token authorization beside the plugin


def test_token_authorization_first_then_the_plugin(tmp_path: Path) -> None:
    srv = start(tmp_path, auth=True)
    try:
        tokens = keys(srv)
        inference = bearer(tokens["inference"]["key"])
        both = {**inference, **key(SWISS_ONLY)}
        assert srv.predict("swiss", {}, headers=both).status == 200
        # the token authorizer is asked first: its answer, byte for byte TorchServe's
        no_token = srv.predict("swiss", {}, headers=key(SWISS_ONLY))
        assert_error(no_token, 400, "InvalidKeyException", FAILED)
        assert no_token.json()["message"] == FAILED
        assert_error(srv.predict("swiss", {}, headers=inference), 401, "AccessDeniedException")
        assert_error(srv.predict("other", {}, headers=both), 403, "AccessDeniedException")
        # the management API: its own token; /token the API key
        management = bearer(tokens["management"]["key"])
        assert srv.manage("GET", "/models", headers={**management, **key(ALL)}).status == 200
        wrong_kind = srv.manage("GET", "/models", headers={**inference, **key(ALL)})
        assert_error(wrong_kind, 400, "InvalidKeyException", FAILED)
        api = bearer(tokens["API"]["key"])
        rotated = srv.manage("GET", "/token?type=inference", headers={**api, **key(ALL)})
        assert rotated.status == 200 and "inference" in rotated.json()
        no_api_key = srv.manage("GET", "/token?type=inference", headers={**management, **key(ALL)})
        assert_error(no_api_key, 400, "InvalidKeyException", TOKEN_API_FAILED)
        # the metrics API needs no token, only what the plugin asks
        assert metrics_get(srv, key(ALL)).status == 200
        assert srv.request("GET", "/ping").status == 200
    finally:
        srv.stop()


# --- chained authorizers, one of them raising


def test_all_authorizers_must_allow(chained: Server) -> None:
    good = key(SWISS_ONLY, **{"X-Tenant": "acme"})
    assert chained.predict("swiss", {}, headers=good).status == 200
    no_key = chained.predict("swiss", {}, headers={"X-Tenant": "acme"})
    assert_error(no_key, 401, "AccessDeniedException", MISSING)  # the entry point's, first
    no_tenant = chained.predict("swiss", {}, headers=key(SWISS_ONLY))
    assert_error(no_tenant, 403, "AccessDeniedException", "only tenant acme may call")
    throttled = chained.predict("swiss", {}, headers=key(SWISS_ONLY, **{"X-Tenant": "throttled"}))
    assert_error(throttled, 429, "AccessDeniedException", "tenant throttled: slow down")


def test_grpc_codes_of_denials(chained: Server, ts_protos: dict[str, ModuleType]) -> None:
    assert chained.info is not None
    request = ts_protos["inference_pb2"].PredictionsRequest(model_name="swiss", input={"x": b"1"})
    with grpc.insecure_channel(chained.info.grpc_inference_address) as channel:
        predictions = ts_protos["inference_pb2_grpc"].InferenceAPIsServiceStub(channel).Predictions
        good = key(SWISS_ONLY, **{"X-Tenant": "acme"})
        assert predictions(request, metadata=meta(good), timeout=60).prediction
        codes = {}
        for tenant in ("nobody", "throttled"):
            headers = key(SWISS_ONLY, **{"X-Tenant": tenant})
            codes[tenant] = rpc_fails(predictions, request, metadata=meta(headers)).code()
        mirrored = rpc_fails(predictions, request, metadata=meta(key(ALL, **{"X-Mirror": "g"})))
    assert codes == {
        "nobody": grpc.StatusCode.PERMISSION_DENIED,
        "throttled": grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    assert mirrored.code() == grpc.StatusCode.PERMISSION_DENIED  # 418: any other status
    seen = json.loads(mirrored.details())
    assert re.fullmatch(r"127\.0\.0\.1:\d+", seen.pop("peer")), seen
    assert seen == {
        "api": "inference",
        "method": "Predictions",
        "path": "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
        "model": "swiss",
        "protocol": "grpc",
        "mirror": "g",
    }


def test_what_an_authorizer_is_told_over_rest(chained: Server) -> None:
    def seen(response: Response, status: int = 418) -> dict[str, Any]:
        assert response.status == status, response.body
        doc = response.json()
        found: dict[str, Any] = json.loads(doc.get("message") or doc["error"])
        assert re.fullmatch(r"127\.0\.0\.1:\d+", found.pop("peer")), found
        return found

    mirror = key(ALL, **{"X-Mirror": "r"})
    predicted = seen(chained.predict("other", {}, headers=mirror))
    assert predicted == {
        "api": "inference",
        "method": "POST",
        "path": "/predictions/other",
        "model": "other",
        "protocol": "http",
        "mirror": "r",
    }
    infer = seen(chained.request("POST", "/v2/models/swiss/versions/1.0/infer", b"{}", mirror))
    assert infer["path"] == "/v2/models/swiss/versions/1.0/infer" and infer["model"] == "swiss"
    described = seen(chained.manage("PUT", "/models/other?min_worker=1", headers=mirror))
    assert (described["api"], described["method"], described["model"]) == (
        "management",
        "PUT",
        "other",
    )
    listed = seen(chained.manage("GET", "/models", headers=mirror))
    assert listed["model"] is None and listed["path"] == "/models"
    metrics = seen(metrics_get(chained, mirror))
    assert (metrics["api"], metrics["path"], metrics["model"]) == ("metrics", "/metrics", None)


@pytest.mark.daemon_errors(r"authorizer flaky failed on http POST /predictions/swiss")
def test_an_authorizer_that_raises_fails_that_request_only(chained: Server) -> None:
    good = key(SWISS_ONLY, **{"X-Tenant": "acme"})
    failed = chained.predict("swiss", {}, headers={**good, "X-Boom": "1"})
    assert_error(failed, 500, "InternalServerException", AUTHORIZER_FAILED)
    assert "secret" not in failed.body.decode() and "RuntimeError" not in failed.body.decode()
    assert chained.predict("swiss", {}, headers=good).status == 200  # the next one is fine
    log = chained.log_dir / "ts_log.log"
    chained.wait_for(lambda: "flaky's secret detail" in log.read_text())
    text = log.read_text()
    assert "authorizer flaky failed on http POST /predictions/swiss (inference API)" in text
    assert "RuntimeError: flaky's secret detail" in text  # the traceback


@pytest.mark.daemon_errors(r"authorizer flaky failed on grpc Predictions")
def test_an_authorizer_that_raises_on_grpc_is_internal(
    chained: Server, ts_protos: dict[str, ModuleType]
) -> None:
    assert chained.info is not None
    request = ts_protos["inference_pb2"].PredictionsRequest(model_name="swiss", input={"x": b"1"})
    good = key(SWISS_ONLY, **{"X-Tenant": "acme"})
    with grpc.insecure_channel(chained.info.grpc_inference_address) as channel:
        predictions = ts_protos["inference_pb2_grpc"].InferenceAPIsServiceStub(channel).Predictions
        failed = rpc_fails(predictions, request, metadata=meta({**good, "X-Boom": "1"}))
        assert predictions(request, metadata=meta(good), timeout=60).prediction
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert failed.details().startswith(AUTHORIZER_FAILED) and "secret" not in failed.details()
    log = chained.log_dir / "ts_log.log"
    chained.wait_for(lambda: "authorizer flaky failed on grpc Predictions" in log.read_text())
