"""Token authorization as TorchServe 0.12 does it; the CLI needs no flags on the same host."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator

import pytest

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow
FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("auth"), properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    started = srv.start("swiss.mar", auth=True)
    assert "Token authorization is on" in started.stdout
    yield srv
    srv.stop()


def keys(server: Server) -> dict[str, dict[str, str]]:
    loaded: dict[str, dict[str, str]] = json.loads((server.root / "key_file.json").read_text())
    return loaded


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_file(server: Server) -> None:
    path = server.root / "key_file.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = keys(server)
    assert set(doc) == {"management", "inference", "API"}
    assert "expiration time" in doc["management"] and "expiration time" in doc["inference"]


def test_missing_and_wrong_tokens_are_400(server: Server) -> None:
    assert_error(server.predict("swiss", {}), 400, "InvalidKeyException", FAILED)
    wrong = server.predict("swiss", {}, headers=bearer("nope"))
    assert_error(wrong, 400, "InvalidKeyException", FAILED)
    mixed = server.predict("swiss", {}, headers=bearer(keys(server)["management"]["key"]))
    assert_error(mixed, 400, "InvalidKeyException", FAILED)
    assert_error(server.manage("GET", "/models"), 400, "InvalidKeyException", FAILED)


def test_right_tokens_work_and_ping_needs_none(server: Server) -> None:
    assert server.request("GET", "/ping").status == 200
    doc = keys(server)
    assert server.predict("swiss", {}, headers=bearer(doc["inference"]["key"])).status == 200
    assert server.manage("GET", "/models", headers=bearer(doc["management"]["key"])).status == 200


def test_rotating_a_key(server: Server) -> None:
    old = keys(server)["inference"]["key"]
    api = keys(server)["API"]["key"]
    assert_error(
        server.manage("GET", "/token?type=inference", headers=bearer(old)),
        400,
        "InvalidKeyException",
    )
    rotated = server.manage("GET", "/token?type=inference", headers=bearer(api))
    assert rotated.status == 200
    new = rotated.json()["inference"]["key"]
    assert new != old and keys(server)["inference"]["key"] == new
    assert_error(server.predict("swiss", {}, headers=bearer(old)), 400, "InvalidKeyException")
    assert server.predict("swiss", {}, headers=bearer(new)).status == 200


def test_cli_needs_no_flags(server: Server) -> None:
    listed = server.tsctl("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["models"][0]["modelName"] == "swiss"
    body = server.root / "in.json"
    body.write_text("{}")
    answered = server.tsctl("infer", "swiss", str(body))
    assert answered.returncode == 0, answered.stderr
    status = server.tsctl("serve", "status", "--state-dir", str(server.state_dir), "--json")
    assert status.returncode == 0, status.stderr


def test_expired_keys_fail_and_the_cli_rotates_them(tmp_path: object) -> None:
    from pathlib import Path

    srv = Server(Path(str(tmp_path)), properties={"token_expiration_min": 0.01})  # 0.6 s
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar", auth=True)
    try:
        key = keys(srv)["inference"]["key"]
        srv.wait_for(lambda: srv.predict("swiss", {}, headers=bearer(key)).status == 400)
        body = srv.root / "in.json"
        body.write_text("{}")
        answered = srv.tsctl("infer", "swiss", str(body))  # rotates the expired key first
        assert answered.returncode == 0, answered.stderr
        assert keys(srv)["inference"]["key"] != key
    finally:
        srv.stop()


def test_grpc_needs_the_key_in_metadata(server: Server, tmp_path: object) -> None:
    import grpc

    assert server.info is not None
    body = server.root / "in.bin"
    body.write_bytes(b"x")
    answered = server.tsctl("infer", "swiss", str(body), "--grpc")  # the CLI brings the key
    assert answered.returncode == 0, answered.stderr
    without = server.tsctl("infer", "swiss", str(body), "--grpc", "--url", "localhost:1")
    assert without.returncode == 1
    # a raw call without metadata: the generic method path, no generated stubs needed
    with grpc.insecure_channel(server.info.grpc_inference_address) as channel:
        call = channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\n\x05swiss", timeout=30)  # PredictionsRequest{model_name: "swiss"}
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert FAILED in caught.value.details()
