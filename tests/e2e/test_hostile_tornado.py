"""Hostile clients on the tornado ports (management, metrics) and the gRPC ports: bodies over
the size limit, tokens that are not ASCII, too many connections, clients that go quiet.

Real daemons on free ports over real sockets. A socket's own timeout in these tests only keeps
a broken daemon from hanging the run: no test measures how long anything took.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from concurrent.futures import Future
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

LIMIT = 100_000  # max_request_size
#: only keeps a daemon that never answers or closes from hanging the test run
HANG_GUARD = 30.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Token authorization on and a small `max_request_size`."""
    srv = Server(tmp_path_factory.mktemp("guarded"), properties={"max_request_size": LIMIT})
    srv.start(auth=True)
    yield srv
    srv.stop()


def keys(server: Server) -> dict[str, dict[str, str]]:
    loaded: dict[str, dict[str, str]] = json.loads((server.root / "key_file.json").read_text())
    return loaded


def token(server: Server, kind: str = "management") -> dict[str, str]:
    return {"Authorization": f"Bearer {keys(server)[kind]['key']}"}


def host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(address: str) -> socket.socket:
    sock = socket.create_connection(host_port(address), timeout=HANG_GUARD)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (a reset counts as closed)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# --- a token that is not ASCII


@pytest.mark.parametrize("api", ["management", "inference"])
def test_non_ascii_bearer_token_is_400(guarded: Server, api: str) -> None:
    headers = {"Authorization": "Bearer caf\u00e9"}  # sent as latin-1 bytes
    if api == "management":
        answer = guarded.manage("GET", "/models", headers=headers)
    else:
        answer = guarded.predict("any", {}, headers=headers)
    assert_error(answer, 400, "InvalidKeyException", "Token Authorization failed")


# --- a body over max_request_size on the management API


def test_over_size_body_is_413_and_the_connection_stays_usable(guarded: Server) -> None:
    conn = http.client.HTTPConnection(*host_port(guarded.management), timeout=HANG_GUARD)
    try:
        headers = {**token(guarded), "x-request-id": "big-1"}
        conn.request("POST", "/models", body=b"x" * (LIMIT + 1), headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == 413, body
        assert reply.getheader("x-request-id") == "big-1"
        doc = json.loads(body)
        assert doc["type"] == "RequestEntityTooLargeException"
        assert str(LIMIT) in doc["message"] and str(LIMIT + 1) in doc["message"]
        conn.request("GET", "/models", headers=token(guarded))  # the same connection
        again = conn.getresponse()
        assert again.status == 200, again.read()
        again.read()
    finally:
        conn.close()
    assert '"POST /models HTTP/1.1" 413' in guarded.access_line("POST /models")


def test_over_size_chunked_body_is_413(guarded: Server) -> None:
    conn = http.client.HTTPConnection(*host_port(guarded.management), timeout=HANG_GUARD)
    try:
        pieces = (b"y" * 10_000 for _ in range(LIMIT // 10_000 + 1))
        conn.request("POST", "/models", body=pieces, headers=token(guarded), encode_chunked=True)
        reply = conn.getresponse()
        assert_error_body(reply.status, reply.read(), 413, "RequestEntityTooLargeException")
        conn.request("GET", "/models", headers=token(guarded))
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_over_size_body_announced_with_expect_is_refused_before_it_is_sent(
    guarded: Server,
) -> None:
    with connect(guarded.management) as sock:
        sock.sendall(
            b"POST /models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        answer = read_until_closed(sock)  # no body sent: the daemon answers and closes
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in head and b"connection: close" in head.lower()
    assert json.loads(body)["type"] == "RequestEntityTooLargeException"


def assert_error_body(status: int, body: bytes, want: int, kind: str) -> None:
    assert status == want, body
    assert json.loads(body)["type"] == kind


# --- gRPC: a message over the size limit


def test_over_size_grpc_message_is_resource_exhausted_with_a_reason(
    guarded: Server, ts_protos: dict[str, ModuleType]
) -> None:
    inference_pb2, inference_pb2_grpc = ts_protos["inference_pb2"], ts_protos["inference_pb2_grpc"]
    assert guarded.info is not None
    with grpc.insecure_channel(guarded.info.grpc_inference_address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(
            model_name="any", input={"body": b"z" * (LIMIT + 1)}
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predictions(request, timeout=HANG_GUARD, metadata=_grpc_token(guarded))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details() and str(LIMIT) in error.details()


def _grpc_token(server: Server) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {keys(server)['inference']['key']}")]


# --- max_connections


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Three connections per port at most; one model whose handler can be kept busy."""
    srv = Server(tmp_path_factory.mktemp("crowded"), properties={"max_connections": 3})
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar")
    yield srv
    srv.stop()


def _address(server: Server, api: str) -> str:
    assert server.info is not None
    return server.info.management_address if api == "management" else server.info.metrics_address


def _served(sock: socket.socket, path: str) -> bool:
    """Send one keep-alive request; True when it is answered (False: the daemon closed)."""
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        reply.read()
    except (ConnectionError, http.client.HTTPException):
        return False
    return True


@pytest.mark.parametrize("api", ["management", "metrics"])
def test_connections_beyond_max_connections_are_closed_at_once(crowded: Server, api: str) -> None:
    address = _address(crowded, api)
    path = "/models" if api == "management" else "/metrics"
    held = [connect(address) for _ in range(3)]
    try:
        assert all(_served(sock, path) for sock in held)  # each accepted and counted
        with connect(address) as extra:
            assert not _served(extra, path)
            assert read_until_closed(extra) == b""
        assert all(_served(sock, path) for sock in held)  # the others are unaffected
        log = crowded.log_dir / "ts_log.log"
        crowded.wait_for(lambda: f"the {api} API" in log.read_text())
        assert "reached max_connections (3)" in log.read_text()
        held.pop().close()

        def one_more_is_served() -> bool:
            with connect(address) as sock:
                return _served(sock, path)

        crowded.wait_for(one_more_is_served)  # once the daemon has seen the close
    finally:
        for sock in held:
            sock.close()


def test_grpc_calls_beyond_max_connections_are_resource_exhausted(
    crowded: Server, ts_protos: dict[str, ModuleType]
) -> None:
    inference_pb2, inference_pb2_grpc = ts_protos["inference_pb2"], ts_protos["inference_pb2_grpc"]
    assert crowded.info is not None
    sleep = json.dumps({"action": "sleep", "seconds": 10}).encode()  # the window to look in
    with grpc.insecure_channel(crowded.info.grpc_inference_address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        busy: list[Future[Any]] = [
            stub.Predictions.future(
                inference_pb2.PredictionsRequest(model_name="swiss", input={"body": sleep}),
                timeout=HANG_GUARD,
            )
            for _ in range(3)
        ]
        try:
            # all three in the daemon: one runs, the others wait in the queue or behind it
            # (sent in batches of their own); the module's only predictions
            crowded.wait_for(lambda: crowded.queued("swiss") + crowded.batches_sent("swiss") == 3)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Ping(empty_pb2.Empty())
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        finally:
            for call in busy:
                call.cancel()


# --- clients that go quiet: keep_alive_timeout, request_header_timeout, request_body_timeout


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every client timeout at one second."""
    timeouts = ("keep_alive_timeout", "request_header_timeout", "request_body_timeout")
    srv = Server(tmp_path_factory.mktemp("impatient"), properties=dict.fromkeys(timeouts, 1))
    srv.start()
    yield srv
    srv.stop()


QUIET = {
    "idle": b"",
    "idle-after-a-request": b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n",
    "partial-head": b"GET /models HTTP/1.1\r\nHost: x\r\nX-Slow: 1",
    "partial-body": b"POST /models HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
}


@pytest.mark.parametrize("api", ["management", "metrics"])
@pytest.mark.parametrize("sent", QUIET.values(), ids=QUIET.keys())
def test_a_quiet_client_is_disconnected(impatient: Server, api: str, sent: bytes) -> None:
    with connect(_address(impatient, api)) as sock:
        sock.sendall(sent)
        answer = read_until_closed(sock)  # the daemon closes; only HANG_GUARD would not
    if sent.endswith(b"\r\n\r\n"):  # a whole request, answered before the quiet
        assert answer.startswith(b"HTTP/1.1 "), answer
    else:
        assert answer == b""  # tornado closes without an answer
