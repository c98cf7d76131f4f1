"""What a registration, a scale request or an archive may ask for is bounded: workers per model
(`max_workers_per_model`), started a few at a time; model names and versions; the files a
manifest names (`configFile` inside the archive); downloads that never share a file."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import HANDLERS, Response, Server, make_archive
from tsctl.errors import Conflict, TsctlError
from tsctl.ipc.messages import WorkerState
from tsctl.server import download
from tsctl.server.batching import ModelQueue
from tsctl.server.config import ServerConfig
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.pool import PoolSettings, WorkerPool

pytestmark = pytest.mark.slow

CAP = 3  # the daemon's max_workers_per_model
SECRET = "secret: [the operator's private text"  # YAML that fails to parse, quoting itself


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hardening")
    srv = Server(root, properties={"max_workers_per_model": CAP, "enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "many", "swiss", config={"minWorkers": CAP + 1})
    make_archive(srv.store, "wide", "swiss", config={"maxWorkers": 100})
    (root / "secret.yaml").write_text(SECRET)
    folder_model(srv.store / "escape", configFile="../../secret.yaml")
    folder_model(srv.store / "absolute", configFile=str(root / "secret.yaml"))
    folder_model(srv.store / "badversion", modelVersion="1.0/../../x")
    folder_model(srv.store / "newline", modelVersion="1.0\n")
    srv.start("swiss.mar")
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr


def folder_model(folder: Path, **fields: str) -> None:
    """A model as a folder, its manifest written by hand with `fields` in its model object."""
    (folder / "MAR-INF").mkdir(parents=True)
    shutil.copy(HANDLERS / "swiss.py", folder / "swiss.py")
    model = {"modelName": folder.name, "handler": "swiss.py", "modelVersion": "1.0", **fields}
    manifest = {"runtime": "python", "model": model}
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))


def assert_refused(response: Response, *needles: str) -> str:
    assert response.status == 400, (response.status, response.body)
    message: str = response.json()["message"]
    for needle in needles:
        assert needle in message, message
    return message


LIMIT = f"over max_workers_per_model ({CAP})"


@pytest.mark.parametrize(
    ("path", "setting"),
    [
        (f"/models/swiss?min_worker={CAP + 1}", "min_worker"),
        (f"/models/swiss?min_worker=1&max_worker={CAP + 1}", "max_worker"),
        ("/models/swiss?min_worker=1000000&synchronous=true", "min_worker"),
    ],
)
def test_scaling_past_the_cap_is_refused(server: Server, path: str, setting: str) -> None:
    assert_refused(server.manage("PUT", path), setting, LIMIT)
    workers = server.manage("GET", "/models/swiss").json()[0]["workers"]
    assert len(workers) == 1  # nothing was started


def test_scaling_to_the_cap_is_allowed(server: Server) -> None:
    scaled = server.manage("PUT", f"/models/swiss?min_worker={CAP}&synchronous=true")
    assert scaled.status == 200, scaled.body
    assert len(server.manage("GET", "/models/swiss").json()[0]["workers"]) == CAP
    assert server.manage("PUT", "/models/swiss?min_worker=1&synchronous=true").status == 200


@pytest.mark.parametrize(
    ("path", "needles"),
    [
        (f"/models?url=swiss.mar&model_name=s2&initial_workers={CAP + 1}", ["initial_workers"]),
        ("/models?url=many.mar", ["model-config.yaml minWorkers", LIMIT]),
        ("/models?url=wide.mar", ["model-config.yaml maxWorkers=100", LIMIT]),
    ],
)
def test_registering_past_the_cap_is_refused(server: Server, path: str, needles: list[str]) -> None:
    assert_refused(server.manage("POST", path), *needles)
    assert sorted(m["modelName"] for m in server.manage("GET", "/models").json()["models"]) == [
        "swiss"
    ]


def test_a_model_name_with_a_trailing_newline_is_refused(server: Server) -> None:
    response = server.manage("POST", "/models?url=swiss.mar&model_name=evil%0A")
    assert_refused(response, "invalid model name 'evil\\n'")


@pytest.mark.parametrize("model", ["badversion", "newline"])
def test_a_manifest_version_is_validated(server: Server, model: str) -> None:
    assert_refused(server.manage("POST", f"/models?url={model}"), "invalid model version")


@pytest.mark.parametrize("model", ["escape", "absolute"])
def test_config_file_must_be_inside_the_archive(server: Server, model: str) -> None:
    message = assert_refused(
        server.manage("POST", f"/models?url={model}"), "configFile", "outside the archive"
    )
    assert "private text" not in message


def test_workers_start_a_group_at_a_time() -> None:
    """A pool growing by 7 with groups of 3 starts 3, 3, then 1, each group once the one
    before is up (the processes are stand-ins: what is checked is the pool's order)."""
    events: list[str] = []

    class Stand:
        def __init__(self, worker_id: str) -> None:
            self.worker_id, self.pid, self.max_body = worker_id, None, None
            self.state = WorkerState.STARTING
            self.served, self.recycling = 0, False
            self.dead = asyncio.Event()

        async def start(self) -> None:
            events.append("start")
            await asyncio.sleep(0)
            events.append("up")
            self.state = WorkerState.READY

        def when_dead(self, callback: Any) -> None:
            pass

        async def stop(self) -> None:
            self.state = WorkerState.DEAD

    async def main() -> None:
        settings = PoolSettings(1, 0, 30, 1 << 20, start_group=3)
        pool = WorkerPool("m_1", ("m", "1"), ModelQueue(1), settings, Stand, Metrics())  # type: ignore[arg-type]
        await pool.scale(7)
        assert len(pool.workers) == 7
        await pool.close(TsctlError("closed"))

    asyncio.run(main())
    groups = "".join("s" if e == "start" else "u" for e in events)
    assert groups == "sssuuu" + "sssuuu" + "su"


class Slow(http.server.BaseHTTPRequestHandler):
    """Serves /a/model.mar and /b/model.mar (different bytes): half of each body, then the
    rest once both downloads are under way, after noting the files in the store."""

    barrier: threading.Barrier
    store: Path
    seen: list[list[str]]

    def do_GET(self) -> None:
        body = self.path.encode() * 50_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if self.barrier.wait(timeout=60) == 0:
            self.seen.append(sorted(p.name for p in self.store.iterdir()))
        self.barrier.wait(timeout=60)
        self.wfile.write(body[len(body) // 2 :])

    def log_message(self, *args: Any) -> None:
        pass


def test_two_downloads_of_one_file_name_never_share_a_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    handler = type("Handler", (Slow,), {"barrier": threading.Barrier(2), "store": store})
    handler.seen = []
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{site.server_address[1]}"
    config = ServerConfig(model_store=store, allowed_urls=(rf"{base}/.*",))

    async def both() -> list[str | BaseException]:
        fetches = [download.fetch(config, f"{base}/{d}/model.mar") for d in "ab"]
        return await asyncio.gather(*fetches, return_exceptions=True)

    try:
        outcomes = asyncio.run(both())
    finally:
        site.shutdown()
        site.server_close()
    [listing] = handler.seen
    assert len(listing) == 2 and all(n.startswith(".model.mar.") for n in listing), listing
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "str"]
    assert any(isinstance(o, Conflict) and "already exists" in o.message for o in outcomes)
    content = (store / "model.mar").read_bytes()
    assert content in (b"/a/model.mar" * 50_000, b"/b/model.mar" * 50_000)  # one, whole
    assert [p.name for p in store.iterdir()] == ["model.mar"]  # no temporary file left
    # readable as the process's umask allows, like any file it writes (not mkstemp's 0600)
    assert (store / "model.mar").stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
