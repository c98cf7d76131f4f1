"""KServe v1 over REST (`/v1/models/...`) against a real daemon, judged by kserve's own
`InferenceRESTClient` (run in a child process: tests/support/kserve_client.py) and plain HTTP.

Each instance is one row of the handler's batch (tests/fixtures/handlers/protocol_echo.py says
how many rows it got); the answers are regrouped per request. A handler written for TorchServe's
`kserve` envelope gets the same rows from `/v1/...` as from `/predictions` through the envelope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import kserve_client
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("v1"))
    make_archive(srv.store, "echo", "protocol_echo")
    make_archive(
        srv.store, "batcher", "protocol_echo", config={"batchSize": 4, "maxBatchDelay": 5000}
    )
    srv.start("echo.mar", "batcher.mar")
    yield srv
    srv.stop()


def post(srv: Server, path: str, body: object) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = srv.request("POST", path, data, {"Content-Type": "application/json"})
    return reply.status, reply.json()


KSERVE_V1 = """
async def main(base):
    client = InferenceRESTClient(RESTConfig(protocol="v1"))
    try:
        assert await client.is_model_ready(base, "echo")
        answer = await client.infer(base, {"instances": [[1, 2], {"k": "v"}]}, "echo")
        print(json.dumps(answer))
        explained = await client.explain(base, "echo", {"instances": [3]})
        print(json.dumps(explained))
        try:
            await client.infer(base, {"inputs": []}, "echo")
        except Exception as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            raise AssertionError("a body without instances was answered")
    finally:
        await client.close()
"""


def test_kserve_client_predicts_and_explains(server: Server) -> None:
    printed = [
        json.loads(line) for line in kserve_client.run(KSERVE_V1, server.inference).splitlines()
    ]
    predicted, explained, refused = printed
    assert predicted == {
        "predictions": [{"instance": [1, 2], "batch": 2}, {"instance": {"k": "v"}, "batch": 2}]
    }
    assert explained == {"explanations": [{"instance": 3, "batch": 1, "explain": True}]}
    assert "instances" in refused["error"] and "400" in refused["error"]


def test_models_and_their_ready_state(server: Server) -> None:
    listed = server.request("GET", "/v1/models")
    assert listed.status == 200 and listed.json() == {"models": ["batcher", "echo"]}
    ready = server.request("GET", "/v1/models/echo")
    assert ready.status == 200 and ready.json() == {"name": "echo", "ready": True}
    unknown = server.request("GET", "/v1/models/nope")
    assert unknown.status == 404 and set(unknown.json()) == {"error"}
    assert server.request("GET", "/v1/models/echo:predict").status == 405
    assert server.request("POST", "/v1/models/nope:predict", b"{}").status == 404


def test_bad_bodies_are_400_with_an_error(server: Server) -> None:
    for body, message in (
        (b"not json", "not JSON"),
        ({"instances": "x"}, "instances"),
        ([1, 2], "instances"),
        (b"", "no body"),
    ):
        status, answer = post(server, "/v1/models/echo:predict", body)
        assert status == 400, body
        assert isinstance(answer, dict) and message in answer["error"], answer


def test_tensors_become_lists_and_no_instances_no_call(server: Server) -> None:
    status, answer = post(server, "/v1/models/echo:predict", {"instances": [{"tensor": [1.5, 2]}]})
    assert status == 200 and answer == {"predictions": [[3.0, 4.0]]}
    assert post(server, "/v1/models/echo:predict", {"instances": []}) == (200, {"predictions": []})


def test_a_bad_request_fails_alone_in_its_batch(server: Server, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(server.predict, "batcher", {"hold": str(gate)})
        server.wait_for(lambda: Path(f"{gate}.started").exists())
        good = pool.submit(post, server, "/v1/models/batcher:predict", {"instances": [1, 2, 3]})
        bad = pool.submit(post, server, "/v1/models/batcher:predict", {"instance": [1]})
        server.wait_for(lambda: server.queued("batcher") == 2)
        gate.touch()
        assert held.result(timeout=60).status == 200
        assert good.result(timeout=60) == (
            200,
            {"predictions": [{"instance": i, "batch": 3} for i in (1, 2, 3)]},
        )
        status, answer = bad.result(timeout=60)
        assert status == 400 and "instances" in answer["error"]  # type: ignore[index]


def test_kserve_envelope_handlers_see_the_same_rows(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"service_envelope": "kserve"})
    make_archive(srv.store, "echo", "protocol_echo")
    srv.start("echo.mar")
    try:
        body = {"instances": [{"a": 1}, {"b": 2}]}
        direct = post(srv, "/v1/models/echo:predict", body)
        enveloped = post(srv, "/predictions/echo", body)
        expected = {
            "predictions": [{"instance": {"a": 1}, "batch": 2}, {"instance": {"b": 2}, "batch": 2}]
        }
        assert direct == (200, expected)
        assert enveloped == (200, expected)
    finally:
        srv.stop()
