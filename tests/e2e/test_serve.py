"""The inference API against a real daemon with real workers, over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("serve"))
    make_archive(srv.store, "swiss", "swiss", version="1.0")
    make_archive(srv.store, "swiss2", "swiss", version="2.0")
    make_archive(srv.store, "batched", "swiss", config={"batchSize": 8, "maxBatchDelay": 2000})
    make_archive(srv.store, "slow", "swiss", config={"responseTimeout": 1})
    make_archive(srv.store, "classy", "classy", config={"handler": {"factor": 3}})
    srv.start("swiss.mar", "swiss=swiss2.mar", "batched.mar", "slow.mar", "classy.mar")
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr


def assert_error(response: object, status: int, kind: str, *needles: str) -> None:
    from tests.support.daemon import Response

    assert isinstance(response, Response)
    assert response.status == status, (response.status, response.body)
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("x-request-id")
    doc = response.json()
    assert doc["code"] == status and doc["type"] == kind, doc
    for needle in needles:
        assert needle in doc["message"], doc


def ok(server: Server, model: str = "swiss") -> dict[str, object]:
    response = server.predict(model, {"action": "echo"})
    assert response.status == 200, response.body
    doc: dict[str, object] = response.json()
    return doc


def test_ping(server: Server) -> None:
    response = server.request("GET", "/ping")
    assert response.status == 200
    assert response.json() == {"status": "Healthy"}
    assert response.headers["x-request-id"]


def test_raw_json_body(server: Server) -> None:
    response = server.predict("swiss", {"action": "echo"}, headers={"X-Probe": "p1"})
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["types"] == {"body": "dict"}
    assert doc["probe"] == "p1"
    assert doc["request_id"] == response.headers["x-request-id"]
    assert doc["version"] == "1.0"


def test_worker_collects_garbage_once_initialized(server: Server) -> None:
    """The worker imports torch and initializes with the collector off, then turns it back
    on with what start-up built frozen."""
    response = server.predict("swiss", {"action": "echo", "gc": True})
    assert response.status == 200, response.body
    gc_state = response.json()["gc"]
    assert isinstance(gc_state, dict)
    assert gc_state["enabled"] is True
    assert gc_state["frozen"] > 10_000  # everything start-up built


@pytest.mark.parametrize(
    ("content_type", "body", "kind"),
    [
        ("image/jpeg", b"\xff\xd8\xff\x00binary", "bytearray"),
        ("text/plain", b"hello", "str"),
        ("application/octet-stream", b"\x00\x01", "bytearray"),
    ],
)
def test_raw_body_types(server: Server, content_type: str, body: bytes, kind: str) -> None:
    response = server.predict("swiss", body, headers={"Content-Type": content_type})
    assert response.status == 200
    assert response.json()["types"] == {"body": kind}


def test_put_works_like_post(server: Server) -> None:
    response = server.request("PUT", "/predictions/swiss", b"abc", {"Content-Type": "text/plain"})
    assert response.status == 200
    assert response.json()["values"] == {"body": "abc"}


def test_multipart_files_and_fields(server: Server) -> None:
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="a.jpg"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\nAAAA\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="b.jpg"; filename="b.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\nBBBBBB\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = server.predict(
        "swiss", body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status == 200, response.body
    doc = response.json()
    assert doc["types"] == {"a.jpg": "bytearray", "b.jpg": "bytearray", "note": "bytearray"}
    assert doc["values"] == {"a.jpg": 4, "b.jpg": 6, "note": 2}


def test_urlencoded_form_and_query(server: Server) -> None:
    response = server.request(
        "POST",
        "/predictions/swiss?x=1",
        b"a=1&b=two",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 200
    # like TorchServe: form fields are inputs, query parameters are not
    assert response.json()["values"] == {"a": 1, "b": 3}


def test_any_method_predicts_like_torchserve(server: Server) -> None:
    for method in ("GET", "DELETE"):
        response = server.request(method, "/predictions/swiss")
        assert response.status == 200
        assert response.json()["types"] == {"body": "bytearray"}


def test_versioned_predictions(server: Server) -> None:
    assert ok(server)["version"] == "1.0"  # the first loaded version is the default
    v2 = server.request(
        "POST", "/predictions/swiss/2.0", json.dumps({}), {"Content-Type": "application/json"}
    )
    assert v2.status == 200
    assert v2.json()["version"] == "2.0"
    v1 = server.request(
        "POST", "/predictions/swiss/1.0", b"{}", {"Content-Type": "application/json"}
    )
    assert v1.json()["version"] == "1.0"


def test_handler_sets_status_content_type_and_headers(server: Server) -> None:
    response = server.predict("swiss", {"action": "status"})
    assert response.status == 201
    assert response.headers["content-type"] == "text/csv"
    assert response.headers["x-custom"] == "yes"
    assert response.body == b"a,b\n1,2"


def test_bytes_answer_is_sent_raw(server: Server) -> None:
    response = server.predict("swiss", {"action": "bytes"})
    assert response.status == 200
    assert response.body == bytes(range(256))


def test_class_handler_with_yaml_config(server: Server) -> None:
    response = server.predict("classy", "[1, 2, 3]", headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert response.json() == [3, 6, 9]


def test_unknown_model_and_version(server: Server) -> None:
    assert_error(server.predict("nope", b"x"), 404, "ModelNotFoundException", "nope")
    response = server.request("POST", "/predictions/swiss/9.9", b"x")
    assert_error(response, 404, "ModelVersionNotFoundException", "9.9", "swiss")


def test_unknown_path_and_method(server: Server) -> None:
    assert_error(server.request("GET", "/nothing/here"), 404, "ResourceNotFoundException")
    assert_error(server.request("OPTIONS", "/predictions/swiss"), 405, "MethodNotAllowedException")


def test_body_over_max_request_size(server: Server) -> None:
    response = server.predict("swiss", b"x" * (6553500 + 1), headers={"Content-Type": "text/plain"})
    assert_error(response, 413, "RequestEntityTooLargeException", "max_request_size")
    ok(server)


def test_huge_declared_body_is_refused_before_reading(server: Server) -> None:
    host, port = server.inference.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"
        )
        reply = sock.makefile("rb").read()  # the server answers and closes
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"exceeds max_request_size" in reply
    ok(server)


def test_chunked_body_over_the_limit(server: Server) -> None:
    host, port = server.inference.removeprefix("http://").split(":")
    import http.client

    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"y" * 1_000_000 for _ in range(8))
    conn.request(
        "POST",
        "/predictions/swiss",
        body=chunks,
        encode_chunked=True,
        headers={"Content-Type": "text/plain", "Transfer-Encoding": "chunked"},
    )
    reply = conn.getresponse()
    assert reply.status == 413
    assert json.loads(reply.read())["type"] == "RequestEntityTooLargeException"
    conn.close()
    ok(server)


def test_malformed_multipart_is_a_400(server: Server) -> None:
    response = server.predict(
        "swiss", b"not multipart at all", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(response, 400, "BadRequestException")
    ok(server)


@pytest.mark.daemon_errors("ValueError: boom from handler")
def test_handler_exception(server: Server) -> None:
    response = server.predict("swiss", {"action": "raise"}, headers={"X-Request-Id": "req-boom"})
    # TorchServe's answer, nothing of the exception (its text may hold paths or data) ...
    assert_error(response, 503, "InternalServerException")
    assert response.json()["message"] == "Prediction failed"
    assert b"boom" not in response.body and b"ValueError" not in response.body
    assert response.headers["x-request-id"] == "req-boom"
    # ... which is in model_log.log, with its traceback, under the request id
    server.wait_for(lambda: "boom from handler" in server.model_log())
    log = server.model_log()
    assert "request ids req-boom:" in log and "Traceback" in log
    ok(server)


def test_wrong_number_of_answers(server: Server) -> None:
    response = server.predict("swiss", {"action": "short"})
    assert_error(response, 503, "InternalServerException", "0 results for a batch of 1")
    ok(server)


def test_unserializable_answer(server: Server) -> None:
    response = server.predict("swiss", {"action": "unserializable"})
    assert_error(response, 503, "InternalServerException", "not serialisable")
    ok(server)


def test_worker_that_dies(server: Server) -> None:
    before = ok(server)["pid"]
    response = server.predict("swiss", {"action": "die"})
    assert_error(response, 500, "InternalServerException", "died")
    after = ok(server)["pid"]  # waits in the queue while the worker restarts
    assert after != before


@pytest.mark.daemon_errors("worker 9000-slow_1.0 overran the response timeout; replacing it")
def test_handler_past_the_response_timeout(server: Server) -> None:
    before = ok(server, "slow")["pid"]
    response = server.request(
        "POST",
        "/predictions/slow",
        json.dumps({"action": "sleep", "seconds": 30}),
        {"Content-Type": "application/json"},
    )
    assert_error(response, 500, "InternalServerException", "response timeout of 1 s")
    assert ok(server, "slow")["pid"] != before  # the stuck worker was replaced


def test_concurrent_requests_are_batched(server: Server) -> None:
    results: list[int] = []

    def one() -> None:
        results.append(server.predict("batched", {"action": "echo"}).json()["batch"])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert max(results) > 1, results  # several requests reached the handler as one batch


def test_lone_request_does_not_wait_for_max_batch_delay(server: Server) -> None:
    """batched has maxBatchDelay 2000 ms; a lone client must not pay it (the answer's
    batch size 1 and the server's own timing in the access log show it)."""
    response = server.request(
        "POST", "/predictions/batched?probe=lone", b"{}", {"Content-Type": "application/json"}
    )
    assert response.json()["batch"] == 1
    line = server.access_line("/predictions/batched?probe=lone")
    assert int(line.rsplit(" ", 1)[1]) < 2000


def test_client_disconnect_does_not_disturb_others(server: Server) -> None:
    host, port = server.inference.removeprefix("http://").split(":")
    before = ok(server)["pid"]
    # a request that is slow, then a client that vanishes while its request waits behind it
    marker = server.root / "busy.marker"
    marker.unlink(missing_ok=True)
    slow = threading.Thread(
        target=server.predict,
        args=("swiss", {"action": "sleep", "seconds": 1, "marker": str(marker)}),
    )
    slow.start()
    server.wait_for(marker.exists)  # the only worker is now busy with the slow request
    gone = socket.create_connection((host, int(port)))
    payload = json.dumps({"action": "die"}).encode()
    gone.sendall(
        b"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    gone.close()  # had it reached the worker, it would have killed it
    slow.join()
    assert ok(server)["pid"] == before  # the abandoned "die" request never ran
    assert server.access_line('"POST /predictions/swiss HTTP/1.1" 499')


def test_access_log_and_model_log(server: Server) -> None:
    ok(server)
    assert server.access_line('"POST /predictions/swiss HTTP/1.1" 200')
    server.wait_for(lambda: "MODEL_LOG - worker ready" in server.model_log())
    for name in ("ts_log.log", "model_log.log", "access_log.log"):
        assert (server.log_dir / name).exists()


def test_api_description(server: Server) -> None:
    for method, path in (("OPTIONS", "/"), ("GET", "/api-description")):
        response = server.request(method, path)
        assert response.status == 200
        doc = response.json()
        assert doc["openapi"].startswith("3.")
        assert "/predictions/{model_name}" in doc["paths"]


def test_workers_share_the_cores(server: Server) -> None:
    """Every worker gets cores / all start-up workers, the first model's as much as the last's."""
    from tsctl.server.config import cpu_count

    described = server.request("GET", "/models", api="management").json()["models"]
    total = sum(
        len(d["workers"])
        for m in described
        for d in server.request("GET", f"/models/{m['modelName']}/all", api="management").json()
    )
    expected = str(max(1, cpu_count() // total))
    assert ok(server)["threads"] == expected  # swiss, loaded first
    assert ok(server, "slow")["threads"] == expected  # loaded later


def test_daemon_does_not_load_torch(server: Server) -> None:
    assert server.info is not None
    maps = Path(f"/proc/{server.info.pid}/maps").read_text()
    assert "libtorch" not in maps


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("queue"), properties={"job_queue_size": 2})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "recycled", "swiss", config={"recycleAfterRequests": 3})
    make_archive(srv.store, "fat", "swiss", config={"recycleAboveRssMb": 1})
    srv.start("swiss.mar", "recycled.mar", "fat.mar")
    yield srv
    srv.stop()


def test_queue_full_is_503_with_retry_after(small_queue: Server) -> None:
    srv = small_queue
    marker = srv.root / "busy"
    results: list[int] = []

    def call(body: dict[str, object]) -> None:
        results.append(srv.predict("swiss", body).status)

    busy = threading.Thread(
        target=call, args=({"action": "sleep", "seconds": 1, "marker": str(marker)},)
    )
    busy.start()
    srv.wait_for(marker.exists)  # the worker is busy; now fill the queue (2 places)
    waiting = [threading.Thread(target=call, args=({"action": "echo"},)) for _ in range(2)]
    for t in waiting:
        t.start()
    srv.wait_for(
        lambda: (
            srv.request("GET", "/models/swiss", api="management").json()[0]["jobQueueStatus"][
                "pendingRequests"
            ]
            == 2
        )
    )
    response = srv.predict("swiss", {"action": "echo"})
    assert_error(response, 503, "ServiceUnavailableException", "queue is full")
    assert response.headers["retry-after"] == "1"
    for t in [busy, *waiting]:
        t.join()
    assert sorted(results) == [200, 200, 200]  # the queued ones were served
    ok(srv)


def test_workers_recycled_after_n_requests_lose_nothing(small_queue: Server) -> None:
    pids: list[object] = []
    # every request succeeds while workers are replaced underneath (recycleAfterRequests: 3)
    small_queue.wait_for(
        lambda: pids.append(ok(small_queue, "recycled")["pid"]) or len(set(pids)) >= 3
    )

    def workers() -> list[dict[str, object]]:
        doc = small_queue.request("GET", "/models/recycled", api="management").json()
        return list(doc[0]["workers"])

    small_queue.wait_for(lambda: len(workers()) == 1)  # each predecessor was retired
    assert "recycling worker" in (small_queue.log_dir / "ts_log.log").read_text()


def test_workers_recycled_past_an_rss_limit(small_queue: Server) -> None:
    pids: list[object] = []
    small_queue.wait_for(lambda: pids.append(ok(small_queue, "fat")["pid"]) or len(set(pids)) >= 2)


def test_customized_describe(server: Server) -> None:
    [doc] = server.request("GET", "/models/classy?customized=true", api="management").json()
    assert doc["customizedMetadata"] == {"factor": 3, "kind": "doubler"}  # an object
    [plain] = server.request("GET", "/models/swiss?customized=true", api="management").json()
    assert "customizedMetadata" not in plain  # a function handler has no describe_handle
    assert ok(server)  # the worker still serves predictions after describing itself
