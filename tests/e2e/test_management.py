"""The management API and `tsctl models` against a real daemon."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Response, Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("mgmt"), properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "swiss2", "swiss", version="2.0")
    make_archive(srv.store, "tuned", "swiss", config={"batchSize": 4, "minWorkers": 1})
    for name in ("alpha", "beta", "gamma"):
        make_archive(srv.store, name, "swiss")
    make_archive(srv.store, "broken", "broken")
    srv.start()
    yield srv
    srv.stop()


def status(response: Response, code: int = 200) -> str:
    assert response.status == code, response.body
    message: str = response.json()["status"]
    return message


def workers(server: Server, name: str, version: str | None = None) -> list[dict[str, object]]:
    path = f"/models/{name}" + (f"/{version}" if version else "")
    found: list[dict[str, object]] = server.manage("GET", path).json()[0]["workers"]
    return found


def test_register_infer_unregister(server: Server) -> None:
    message = status(server.manage("POST", "/models?url=swiss.mar&batch_size=8&max_batch_delay=50"))
    assert message == 'Model "swiss" Version: 1.0 registered with 1 initial workers'
    assert server.predict("swiss", {}).status == 200  # tsctl gives it a worker by default
    [described] = server.manage("GET", "/models/swiss").json()
    assert (described["batchSize"], described["maxBatchDelay"]) == (8, 50)
    assert described["loadedAtStartup"] is False
    assert status(server.manage("DELETE", "/models/swiss")) == 'Model "swiss" unregistered'
    assert_error(server.predict("swiss", {}), 404, "ModelNotFoundException")


def test_register_errors(server: Server) -> None:
    status(server.manage("POST", "/models?url=alpha.mar"))
    try:
        assert_error(
            server.manage("POST", "/models?url=alpha.mar"),
            409,
            "ConflictStatusException",
            "Model version 1.0 is already registered for model alpha",
        )
    finally:
        server.manage("DELETE", "/models/alpha")
    assert_error(
        server.manage("POST", "/models?url=missing.mar"),
        404,
        "ModelNotFoundException",
        "Model not found at: missing.mar",
    )
    assert_error(
        server.manage("POST", "/models"), 400, "BadRequestException", "Parameter url is required."
    )
    assert_error(
        server.manage("POST", "/models?url=../../etc/x.mar"),
        400,
        "BadRequestException",
        "outside the model store",
    )
    assert_error(
        server.manage("POST", "/models?url=/etc/passwd"),
        400,
        "BadRequestException",
        "outside the model store",
    )
    assert_error(
        server.manage("POST", "/models?url=alpha.mar&model_name=../x"),
        400,
        "InvalidModelException",
        "'../x'",
    )
    assert_error(
        server.manage("POST", "/models?url=alpha.mar&batch_size=lots"),
        400,
        "BadRequestException",
        "batch_size='lots'",
    )
    assert server.manage("GET", "/models").json()["models"] == []  # nothing half-registered


def test_register_with_a_json_body_and_zero_workers(server: Server) -> None:
    body = json.dumps({"url": "beta.mar", "initial_workers": 0})
    message = status(
        server.manage("POST", "/models", body, headers={"Content-Type": "application/json"})
    )
    assert message.endswith(
        "registered with 0 initial workers. Use scale workers API to add workers for the model."
    )
    assert_error(server.predict("beta", {}), 503, "ServiceUnavailableException", "no worker")
    server.manage("DELETE", "/models/beta")


def test_asynchronous_register(server: Server) -> None:
    answer = server.manage("POST", "/models?url=gamma.mar&synchronous=false")
    assert status(answer, 202) == "Processing worker updates..."  # TorchServe's text, at once
    server.wait_for(lambda: len(workers(server, "gamma")) == 1)
    assert server.predict("gamma", {}).status == 200
    server.manage("DELETE", "/models/gamma")


@pytest.mark.daemon_errors("cannot load the weights", "starting workers for broken")
def test_asynchronous_register_retries_workers_that_fail_to_start(server: Server) -> None:
    # TorchServe tries again with a backoff; its tests count a traceback per try
    answer = server.manage("POST", "/models?url=broken.mar&initial_workers=1&synchronous=false")
    assert status(answer, 202) == "Processing worker updates..."

    def tracebacks() -> int:
        return server.model_log().count("RuntimeError: cannot load the weights")

    server.wait_for(lambda: tracebacks() >= 3)
    ts_log = (server.log_dir / "ts_log.log").read_text()
    assert "starting workers for broken 1.0 failed (try 2; see model_log.log)" in ts_log
    # the server's own line names no exception: the traceback in model_log.log does
    assert "RuntimeError" not in "".join(
        line for line in ts_log.splitlines() if "starting workers for broken" in line
    )
    assert status(server.manage("DELETE", "/models/broken")) == 'Model "broken" unregistered'
    names = [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
    assert "broken" not in names


def test_scaling_is_visible_in_describe(server: Server) -> None:
    status(server.manage("POST", "/models?url=swiss.mar"))
    try:
        assert status(server.manage("PUT", "/models/swiss?min_worker=3&synchronous=true")) == (
            "Workers scaled to 3 for model: swiss"
        )
        pids = {w["pid"] for w in workers(server, "swiss")}
        assert len(pids) == 3 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        status(server.manage("PUT", "/models/swiss?min_worker=1&synchronous=true"))
        [left] = workers(server, "swiss")
        gone = pids - {left["pid"]}
        server.wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in gone))
        assert status(server.manage("PUT", "/models/swiss?min_worker=2"), 202) == (
            "Processing worker updates..."
        )
        # describe lists starting workers too (as TorchServe): wait for both to serve
        server.wait_for(
            lambda: [w["status"] for w in workers(server, "swiss")] == ["READY", "READY"]
        )
        # only min_worker: maxWorkers follows it, as in TorchServe
        [described] = server.manage("GET", "/models/swiss").json()
        assert (described["minWorkers"], described["maxWorkers"]) == (2, 2)
        assert_error(
            server.manage("PUT", "/models/swiss?min_worker=3&max_worker=1"),
            400,
            "BadRequestException",
            "max_worker cannot be less than min_worker.",
        )
        assert_error(
            server.manage("PUT", "/models/nope?min_worker=1"), 404, "ModelNotFoundException"
        )
    finally:
        server.manage("DELETE", "/models/swiss")


def test_versions_and_set_default(server: Server) -> None:
    status(server.manage("POST", "/models?url=swiss.mar"))
    status(server.manage("POST", "/models?url=swiss2.mar&model_name=swiss"))
    try:
        assert server.predict("swiss", {}).json()["version"] == "1.0"
        assert status(server.manage("PUT", "/models/swiss/2.0/set-default")) == (
            'Default version successfully updated for model "swiss" to "2.0"'
        )
        assert server.predict("swiss", {}).json()["version"] == "2.0"
        everything = server.manage("GET", "/models/swiss/all").json()
        assert sorted(m["modelVersion"] for m in everything) == ["1.0", "2.0"]
        for default_version in ("/models/swiss/2.0", "/models/swiss"):
            assert_error(
                server.manage("DELETE", default_version),
                403,
                "InvalidModelVersionException",
                "Cannot remove default version for model swiss",
            )
        assert_error(
            server.manage("PUT", "/models/swiss/9.9/set-default"),
            404,
            "ModelVersionNotFoundException",
            "Model version 9.9 does not exist for model swiss",
        )
        assert_error(
            server.manage("DELETE", "/models/swiss/9.9"),
            404,
            "ModelVersionNotFoundException",
            "Model version: 9.9 does not exist for model: swiss",
        )
        status(server.manage("DELETE", "/models/swiss/1.0"))
        assert server.predict("swiss", {}).json()["version"] == "2.0"
    finally:
        server.manage("DELETE", "/models/swiss")


def test_list_pages(server: Server) -> None:
    for name in ("alpha", "beta", "gamma"):
        status(server.manage("POST", f"/models?url={name}.mar&initial_workers=0"))
    try:
        first = server.manage("GET", "/models?limit=2").json()
        assert first == {
            "nextPageToken": "2",
            "models": [
                {"modelName": "alpha", "modelUrl": "alpha.mar"},
                {"modelName": "beta", "modelUrl": "beta.mar"},
            ],
        }
        second = server.manage("GET", "/models?limit=2&next_page_token=2").json()
        assert second == {"models": [{"modelName": "gamma", "modelUrl": "gamma.mar"}]}
        # TorchServe's tests list at /models/ as well
        assert server.manage("GET", "/models/?limit=2").json() == first
        assert_error(server.manage("GET", "/models?limit=x"), 400, "BadRequestException")
    finally:
        for name in ("alpha", "beta", "gamma"):
            server.manage("DELETE", f"/models/{name}")


def test_describe_errors_and_api_description(server: Server) -> None:
    assert_error(
        server.manage("GET", "/models/nope"), 404, "ModelNotFoundException", "Model not found: nope"
    )
    doc = server.manage("OPTIONS", "/").json()
    assert "/models/{model_name}/{model_version}/set-default" in doc["paths"]


def test_settings_priority(server: Server) -> None:
    """API parameters > model-config.yaml > config.properties (batch_size default 1)."""
    status(server.manage("POST", "/models?url=tuned.mar&batch_size=8"))
    assert server.manage("GET", "/models/tuned").json()[0]["batchSize"] == 8
    server.manage("DELETE", "/models/tuned")
    status(server.manage("POST", "/models?url=tuned.mar"))
    assert server.manage("GET", "/models/tuned").json()[0]["batchSize"] == 4
    server.manage("DELETE", "/models/tuned")
    status(server.manage("POST", "/models?url=alpha.mar"))
    assert server.manage("GET", "/models/alpha").json()[0]["batchSize"] == 1
    server.manage("DELETE", "/models/alpha")


def test_cli(server: Server) -> None:
    url = ["--url", server.management]
    registered = server.tsctl("models", "register", "swiss.mar", "--batch-size", "2", *url)
    assert registered.returncode == 0, registered.stderr
    assert "registered with 1 initial workers" in registered.stdout
    try:
        listed = json.loads(server.tsctl("models", "list", "--json", *url).stdout)
        assert listed == {"models": [{"modelName": "swiss", "modelUrl": "swiss.mar"}]}
        assert "swiss" in server.tsctl("models", "list", *url).stdout
        scaled = server.tsctl("models", "scale", "swiss", "--min-workers", "2", *url)
        assert scaled.stdout.strip() == "Workers scaled to 2 for model: swiss"
        described = json.loads(server.tsctl("models", "describe", "swiss", "--json", *url).stdout)
        assert len(described[0]["workers"]) == 2
        table = server.tsctl("models", "describe", "swiss", "--all", *url)
        assert "batchSize" in table.stdout and "READY" in table.stdout
        default = server.tsctl("models", "set-default", "swiss", "1.0", *url)
        assert default.returncode == 0
        missing = server.tsctl("models", "describe", "nope", *url)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            "tsctl: error: 404 ModelNotFoundException: Model not found: nope"
        )
    finally:
        gone = server.tsctl("models", "unregister", "swiss", *url)
    assert gone.stdout.strip() == 'Model "swiss" unregistered'


def test_model_api_disabled_by_default(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar")
    try:
        assert_error(srv.manage("POST", "/models?url=swiss.mar"), 405, "MethodNotAllowedException")
        assert_error(srv.manage("DELETE", "/models/swiss"), 405, "MethodNotAllowedException")
        assert srv.manage("GET", "/models/swiss").status == 200
        status(srv.manage("PUT", "/models/swiss?min_worker=2&synchronous=true"))
        assert len(workers(srv, "swiss")) == 2
    finally:
        srv.stop()


def test_torchserve_start_flags(tmp_path: Path) -> None:
    """`torchserve --start`'s flags: `--enable-model-api` turns the model API on, `--dt` is
    `--disable-token-auth`, and the Java-only ones are accepted with a warning."""
    srv = Server(tmp_path)
    make_archive(srv.store, "swiss", "swiss")
    log4j = tmp_path / "log4j2.xml"
    started = srv.start(auth=True, flags=("--enable-model-api", "--dt", "--log-config", str(log4j)))
    try:
        assert started.stderr.strip() == (
            f"tsctl: warning: --log-config {log4j} is TorchServe-only (ignored)"
        )
        status(srv.manage("POST", "/models?url=swiss.mar"))  # no key needed, API enabled
        assert srv.predict("swiss", {}).status == 200
    finally:
        srv.stop()


@pytest.fixture
def archive_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on a free port, serving a folder of archives."""
    import functools
    import http.server
    import threading

    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", site
    httpd.shutdown()
    httpd.server_close()


def test_register_from_allowed_urls_only(archive_site: tuple[str, Path], tmp_path: Path) -> None:
    base, site = archive_site
    srv = Server(tmp_path / "srv", properties={
        "enable_model_api": "true",
        # a .properties file, read as Java (and TorchServe) reads it: a backslash is written \\
        "allowed_urls": r"http://127\\.0\\.0\\.1:\\d+/ok/.*",
        "max_archive_expanded_size": 200000,
    })  # fmt: skip
    make_archive(site / "ok", "remote", "swiss")
    (site / "ok" / "huge.mar").write_bytes(os.urandom(300000))
    make_archive(site / "no", "remote", "swiss")
    srv.start()
    try:
        message = status(srv.manage("POST", f"/models?url={base}/ok/remote.mar"))
        assert message.startswith('Model "remote" Version: 1.0 registered')
        assert (srv.store / "remote.mar").exists()  # downloaded into the model store
        assert srv.predict("remote", {}).status == 200
        assert_error(
            srv.manage("POST", f"/models?url={base}/ok/remote.mar"),
            409,
            "ConflictStatusException",
            "already exists",
        )
        assert_error(
            srv.manage("POST", f"/models?url={base}/no/remote.mar"),
            400,
            "BadRequestException",
            "matches no pattern in allowed_urls",
        )
        assert_error(  # a pattern may match it; TorchServe refuses `..` whatever the patterns
            srv.manage("POST", f"/models?url={base}/ok/../ok/remote.mar"),
            400,
            "BadRequestException",
            "Relative path is not allowed in url",
        )
        assert_error(
            srv.manage("POST", f"/models?url={base}/ok/huge.mar"),
            400,
            "DownloadArchiveException",
            "passed 200000 bytes",
        )
        assert_error(
            srv.manage("POST", f"/models?url={base}/ok/missing.mar"),
            400,
            "DownloadArchiveException",
            "404",
        )
        assert not list(srv.store.glob(".*download"))  # nothing half-downloaded is left
    finally:
        srv.stop()
