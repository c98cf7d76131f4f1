"""Request envelopes served by real daemons over real HTTP: one daemon per envelope (json,
kserve, kservev2), each serving an echo handler archived by the real torch-model-archiver 0.12,
alone (`echo`) and batched by two (`pair`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Response, Server, dedent

ECHO_HANDLER = dedent(
    """
    import os
    import time


    def _hold(path):
        # tells the test it runs, then waits for its go: the worker stays busy meanwhile
        open(path + ".started", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)


    def handle(data, context):
        if data is None:
            return None
        out = []
        for item in data:
            if isinstance(item, dict) and "datatype" in item:  # a kservev2 input
                if item["name"] == "hold":
                    _hold(item["data"])
                out.append(len(data) if item["name"] == "count" else item["data"])
                continue
            if isinstance(item, dict) and "hold" in item:
                _hold(item["hold"])
            if isinstance(item, (bytes, bytearray)):
                item = bytes(item).decode()
            out.append({"echo": item, "batch": len(data)})
        return out
    """
)


def archive_echo(tma: Path, store: Path, work: Path, name: str, config: str = "") -> None:
    """The echo handler archived by the real torch-model-archiver 0.12."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "echo.py").write_text(ECHO_HANDLER)
    args = [str(tma), "--model-name", name, "--version", "1.0", "--handler", "echo.py"]
    if config:
        (work / f"{name}.yaml").write_text(config)
        args += ["--config-file", f"{name}.yaml"]
    store.mkdir(parents=True, exist_ok=True)
    args += ["--export-path", str(store), "--force"]
    subprocess.run(args, cwd=work, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tma_exe() -> Path:
    exe = Path(sys.executable).parent / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency"
    return exe


def serve(root: Path, tma: Path, name: str) -> Server:
    srv = Server(root, {"service_envelope": name})
    archive_echo(tma, srv.store, root / "src", "echo")
    archive_echo(tma, srv.store, root / "src", "pair", "batchSize: 2\nmaxBatchDelay: 100\n")
    srv.start("echo.mar", "pair.mar")
    return srv


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("json"), tma_exe, "json")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("kserve"), tma_exe, "kserve")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def v2_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("kservev2"), tma_exe, "kservev2")
    yield srv
    srv.stop()


def one_batch(server: Server, hold: Callable[[str], dict[str, Any]], *bodies: Any) -> list[Any]:
    """Answers to `bodies`, sent by separate clients and run by `pair` as one batch: its only
    worker is kept busy (by a request `hold(path)` that waits for `path`) until all of them
    are queued, then it takes them together."""
    go = server.root / f"go-{uuid.uuid4().hex}"
    answers: list[Response | None] = [None] * (len(bodies) + 1)

    def send(i: int, body: Any) -> None:
        answers[i] = server.predict("pair", body)

    busy = threading.Thread(target=send, args=(len(bodies), hold(str(go))))
    busy.start()
    server.wait_for(Path(f"{go}.started").exists)
    clients = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for client in clients:
        client.start()
    server.wait_for(lambda: server.queued("pair") == len(bodies))
    go.touch()
    for thread in [busy, *clients]:
        thread.join(120)
    assert all(a is not None and a.status == 200 for a in answers), answers
    return [a.json() for a in answers[:-1] if a is not None]


def assert_bad_request(response: Response, *needles: str) -> None:
    assert response.status == 400, (response.status, response.body)
    doc = response.json()
    assert doc["code"] == 400 and doc["type"] == "BadRequestException", doc
    for needle in needles:
        assert needle in doc["message"], doc


@pytest.mark.slow
def test_served_json(json_server: Server) -> None:
    response = json_server.predict("echo", {"instances": [1, {"a": 2}, {"b64": "aGk="}]})
    assert response.status == 200, response.body
    expected = {"predictions": [{"echo": v, "batch": 3} for v in (1, {"a": 2}, "hi")]}
    assert response.body == json.dumps(expected).encode()


@pytest.mark.slow
def test_served_json_batch_is_regrouped(json_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    first, second = one_batch(json_server, hold, {"instances": ["a", "b"]}, {"instances": ["c"]})
    # one handler call saw the three instances; each client got its own share back
    assert first == {"predictions": [{"echo": "a", "batch": 3}, {"echo": "b", "batch": 3}]}
    assert second == {"predictions": [{"echo": "c", "batch": 3}]}


@pytest.mark.slow
def test_served_json_bad_body(json_server: Server) -> None:
    response = json_server.predict("echo", b"nope", headers={"Content-Type": "application/json"})
    assert_bad_request(response, "json envelope", "not JSON")
    response = json_server.predict("echo", {"rows": []})
    assert_bad_request(response, 'no "instances" list')


@pytest.mark.slow
def test_served_json_bad_request_in_a_batch_fails_alone(json_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    go = json_server.root / f"go-{uuid.uuid4().hex}"
    answers: dict[str, Response] = {}

    def send(key: str, body: Any) -> None:
        answers[key] = json_server.predict("pair", body)

    busy = threading.Thread(target=send, args=("hold", hold(str(go))))
    busy.start()
    json_server.wait_for(Path(f"{go}.started").exists)
    good = threading.Thread(target=send, args=("good", {"instances": [1]}))
    bad = threading.Thread(target=send, args=("bad", {"wrong": 1}))
    good.start()
    bad.start()
    json_server.wait_for(lambda: json_server.queued("pair") == 2)
    go.touch()
    for thread in (busy, good, bad):
        thread.join(120)
    assert answers["good"].json() == {"predictions": [{"echo": 1, "batch": 1}]}
    assert_bad_request(answers["bad"], 'no "instances" list')


@pytest.mark.slow
def test_served_kserve(kserve_server: Server) -> None:
    response = kserve_server.predict("echo", {"instances": [[1, 2], "x"]})
    assert response.status == 200, response.body
    assert response.json() == {
        "predictions": [{"echo": [1, 2], "batch": 2}, {"echo": "x", "batch": 2}]
    }
    response = kserve_server.predict("echo", {"instances": [3]}, headers={"explain": "True"})
    assert response.json() == {"explanations": [{"echo": 3, "batch": 1}]}
    assert_bad_request(kserve_server.predict("echo", {"inputs": []}), 'no "instances" list')


@pytest.mark.slow
def test_served_kserve_batch_is_regrouped(kserve_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    answers = one_batch(kserve_server, hold, {"instances": [1]}, {"instances": [2, 3]})
    assert answers == [
        {"predictions": [{"echo": 1, "batch": 3}]},
        {"predictions": [{"echo": 2, "batch": 3}, {"echo": 3, "batch": 3}]},
    ]


@pytest.mark.slow
def test_served_kservev2(v2_server: Server) -> None:
    request = {
        "id": "r-1",
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        ],
    }
    response = v2_server.predict("echo", request)
    assert response.status == 200, response.body
    assert response.json() == {
        "id": "r-1",
        "model_name": "echo",
        "model_version": "1.0",
        "outputs": [
            {"name": "x", "datatype": "INT64", "data": [1, 2, 3, 4], "shape": [4]},
            {"name": "t", "datatype": "BYTES", "data": ["hi"], "shape": [1]},
        ],
    }
    del request["id"]
    response = v2_server.predict("echo", request)
    assert response.json()["id"] == response.headers["x-request-id"]
    bad = {"inputs": [{"name": "q", "shape": [3], "datatype": "INT64", "data": [1, 2]}]}
    assert_bad_request(v2_server.predict("echo", bad), "2 values do not fit shape [3]")


@pytest.mark.slow
def test_served_kservev2_batch_is_regrouped(v2_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"inputs": [{"name": "hold", "shape": [1], "datatype": "BYTES", "data": [path]}]}

    count = {"name": "count", "shape": [1], "datatype": "INT64", "data": [0]}
    one = {"id": "a", "inputs": [{"name": "p", "shape": [1], "datatype": "FP64", "data": [0.5]}]}
    two = {"id": "b", "inputs": [{"name": "q", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
    first, second = one_batch(v2_server, hold, one, {**two, "inputs": [*two["inputs"], count]})
    assert first["id"] == "a" and second["id"] == "b"
    assert first["outputs"] == [{"name": "p", "datatype": "FP64", "data": [0.5], "shape": [1]}]
    assert second["outputs"] == [
        {"name": "q", "datatype": "INT64", "data": [1, 2], "shape": [2]},
        # the handler ran once for both requests: three inputs
        {"name": "count", "datatype": "INT64", "data": [3], "shape": [1]},
    ]
