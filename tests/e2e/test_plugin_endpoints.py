"""Plugin endpoints on real daemons (issue 17): the stats example installed from its package's
entry points (`GET /models/{name}/stats` on the management API), inference-API endpoints from
`--plugins-path` (a coroutine, a blocking function, one that raises, ones past the deadline),
405 for a method an endpoint does not list, the start-up error for a plugin that would shadow a
built-in route, and token authorization on a plugin's management path."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Response, Server, make_archive
from tests.support.plugins import install_example, write_plugin
from tsctl.errors import NOT_ALLOWED_MESSAGE
from tsctl.local import pidfile

pytestmark = pytest.mark.slow

ENDPOINTS = """
import threading
import time

from tsctl.plugins import Endpoint, Reply


class Echo(Endpoint):
    name = "echo"
    api = "inference"
    path = "/echo/{word}"
    methods = ("GET", "POST")

    async def handle(self, request):
        doc = {
            "word": request.params["word"],
            "query": request.query,
            "size": len(request.body),
            "api": request.info.api,
            "thread": threading.current_thread().name,
        }
        return Reply(doc, headers={"X-Echo": "yes"})


class Blocking(Endpoint):
    name = "blocking"
    api = "inference"
    path = "/blocking"

    def handle(self, request):
        time.sleep(0.05)  # a blocking call: fine on the endpoints' threads
        return Reply("slept in " + threading.current_thread().name)


class Raiser(Endpoint):
    name = "raiser"
    api = "inference"
    path = "/raise"

    async def handle(self, request):
        raise RuntimeError("secret plugin detail")


PLUGINS = [Echo, Blocking, Raiser]
"""

#: the 20-line plugin of the endpoint notes (docs/plugins.md), as written there
UPTIME = """
import time
from tsctl.plugins import Endpoint, Reply

class Uptime(Endpoint):
    name = "uptime"
    api = "management"               # or "inference"
    path = "/uptime/{unit}"          # {unit} captures one path segment
    methods = ("GET",)

    def setup(self, server):
        self.started, self.server = time.monotonic(), server

    async def handle(self, request):  # async: runs on the event loop, must not block
        factor = {"s": 1, "min": 60, "h": 3600}.get(request.params["unit"])
        if factor is None:
            return Reply({"code": 400, "message": "unit: s, min or h"}, status=400)
        uptime = (time.monotonic() - self.started) / factor
        return Reply({"uptime": uptime, "models": len(self.server.models())})

PLUGINS = [Uptime]
"""

SLOW = """
import asyncio
import threading
from pathlib import Path

from tsctl.plugins import Endpoint, Reply


class Marking(Endpoint):
    api = "inference"

    def setup(self, server):
        self.marker = Path(server.setting("log_dir")) / f"{self.name}.entered"


class Sleepy(Marking):
    name = "sleepy"
    path = "/sleepy"

    async def handle(self, request):
        self.marker.touch()
        await asyncio.sleep(3600)
        return Reply("late")


class Stuck(Marking):
    name = "stuck"
    path = "/stuck"

    def handle(self, request):
        self.marker.touch()
        threading.Event().wait(3600)  # a thread that never comes back
        return Reply("late")


class Quick(Endpoint):
    name = "quick"
    api = "inference"
    path = "/quick"

    async def handle(self, request):
        return Reply("quick")


PLUGINS = [Sleepy, Stuck, Quick]
"""

SHADOW = """
from tsctl.plugins import Endpoint, Reply


class MyPing(Endpoint):
    name = "my-ping"
    api = "inference"
    path = "/ping"

    def handle(self, request):
        return Reply("pong")


PLUGINS = [MyPing]
"""


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("endpoints")
    site = install_example("stats_endpoint", root / "site")
    folder = root / "plugins"
    write_plugin(folder, "endpoints", ENDPOINTS)
    write_plugin(folder, "uptime", UPTIME)
    properties = {"cors_allowed_origin": "*", "max_request_size": 4096}
    srv = Server(root / "srv", properties=properties)
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "other", "swiss", version="2.0")
    srv.start("swiss.mar", "other.mar", env=_env(site), flags=("--plugins-path", str(folder)))
    yield srv
    srv.stop()


def _ok(response: Response) -> Response:
    assert response.status == 200, (response.status, response.body)
    assert response.headers.get("x-request-id")
    assert response.headers.get("access-control-allow-origin") == "*"  # as built-in routes
    return response


# --- the stats example (management API, from an installed package's entry point)


def _requests(server: Server, model: str) -> int:
    [version] = _ok(server.manage("GET", f"/models/{model}/stats")).json()["versions"]
    count: int = version["requests"]
    return count


def test_the_stats_endpoint_counts_predictions_and_orders_percentiles(server: Server) -> None:
    before = _requests(server, "swiss")
    sent = 7
    for n in range(sent):
        assert server.predict("swiss", {"n": n}).status == 200
    reply = _ok(server.manage("GET", "/models/swiss/stats"))
    assert reply.headers["content-type"] == "application/json"
    doc = reply.json()
    assert doc["modelName"] == "swiss"
    [version] = doc["versions"]
    assert version["modelVersion"] == "1.0"
    assert version["requests"] == before + sent
    latency = version["latencyMs"]
    assert set(latency) == {"p50", "p90", "p99"}
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    line = server.access_line("/models/swiss/stats")
    assert '"GET /models/swiss/stats HTTP/1.1" 200' in line


def test_the_stats_of_a_model_with_no_predictions_have_no_percentiles(server: Server) -> None:
    doc = _ok(server.manage("GET", "/models/other/stats")).json()
    assert doc["versions"] == [
        {
            "modelVersion": "2.0",
            "requests": 0,
            "latencyMs": {"p50": None, "p90": None, "p99": None},
        }
    ]


def test_the_stats_of_an_unknown_model_are_404(server: Server) -> None:
    reply = server.manage("GET", "/models/nope/stats")
    assert_error(reply, 404, "ModelNotFoundException", "Model not found: nope")


def test_other_methods_on_the_stats_path_stay_built_in(server: Server) -> None:
    # PUT /models/{name}/{version}: scaling version "stats", which does not exist
    scaled = server.manage("PUT", "/models/swiss/stats?min_worker=1")
    assert_error(scaled, 404, "ModelVersionNotFoundException")
    # POST is neither the plugin's nor the built-in route's
    assert_error(server.manage("POST", "/models/swiss/stats"), 405, "MethodNotAllowedException")
    assert _ok(server.manage("GET", "/models/swiss/1.0")).json()[0]["modelVersion"] == "1.0"


def test_the_documented_management_plugin_from_a_folder(server: Server) -> None:
    doc = _ok(server.manage("GET", "/uptime/min")).json()
    assert doc["models"] == 2 and doc["uptime"] >= 0
    refused = server.manage("GET", "/uptime/day")
    assert refused.status == 400 and refused.json() == {"code": 400, "message": "unit: s, min or h"}


# --- inference-API endpoints from --plugins-path


def test_a_coroutine_endpoint_runs_on_the_loop(server: Server) -> None:
    reply = _ok(server.request("GET", "/echo/hello%20you?a=1&a=2&b="))
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-echo"] == "yes"
    doc = reply.json()
    assert doc["word"] == "hello you"
    assert doc["query"] == {"a": ["1", "2"], "b": [""]}
    assert doc["api"] == "inference" and doc["thread"] == "MainThread"
    posted = _ok(server.request("POST", "/echo/x", b"z" * 100)).json()
    assert posted["size"] == 100
    assert '"POST /echo/x HTTP/1.1" 200' in server.access_line("/echo/x")


def test_a_plugin_endpoint_body_is_bounded_by_max_request_size(server: Server) -> None:
    reply = server.request("POST", "/echo/x", b"z" * 5000)
    assert_error(reply, 413, "RequestEntityTooLargeException", "exceeds max_request_size (4096)")


def test_a_plain_function_endpoint_runs_on_a_thread(server: Server) -> None:
    reply = _ok(server.request("GET", "/blocking"))
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.body.decode().startswith("slept in tsctl-endpoint-")


@pytest.mark.daemon_errors(r"plugin raiser: GET /raise failed \(request id [\w-]+\)")
def test_an_endpoint_that_raises_fails_that_request_only(server: Server) -> None:
    reply = server.request("GET", "/raise")
    assert_error(reply, 500, "InternalServerException", "plugin endpoint raiser")
    assert b"secret" not in reply.body
    assert _ok(server.request("GET", "/echo/next")).json()["word"] == "next"
    assert server.request("GET", "/raise").status == 500  # each time, and only that request
    assert server.predict("swiss", {}).status == 200
    log = (server.log_dir / "ts_log.log").read_text()
    rid = json.loads(reply.body)["message"].split("request id ")[1].split(")")[0]
    assert f"plugin raiser: GET /raise failed (request id {rid})" in log
    assert "RuntimeError: secret plugin detail" in log  # the traceback, in the log only


def test_a_method_the_endpoint_does_not_list_is_405(server: Server) -> None:
    reply = server.request("DELETE", "/echo/x")
    assert_error(reply, 405, "MethodNotAllowedException", NOT_ALLOWED_MESSAGE)
    assert_error(server.request("POST", "/blocking"), 405, "MethodNotAllowedException")
    assert server.request("GET", "/ping").json() == {"status": "Healthy"}  # built-ins untouched


# --- the response timeout


def test_past_the_deadline_is_504_while_other_requests_are_answered(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    write_plugin(folder, "slow", SLOW)
    srv = Server(tmp_path / "srv", properties={"default_response_timeout": 3})
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar", flags=("--plugins-path", str(folder)))
    try:
        _time_out(srv)
    finally:
        srv.stop()


def _time_out(srv: Server) -> None:
    answered: list[tuple[str, Response]] = []

    def slow(path: str) -> None:
        answered.append((path, srv.request("GET", path)))

    threads = [threading.Thread(target=slow, args=(p,)) for p in ("/sleepy", "/stuck")]
    for thread in threads:
        thread.start()
    srv.wait_for(lambda: (srv.log_dir / "sleepy.entered").exists())
    srv.wait_for(lambda: (srv.log_dir / "stuck.entered").exists())
    # both are waiting on their plugins: the loop and the other threads still answer
    assert srv.request("GET", "/quick").body == b"quick"
    assert srv.request("GET", "/ping").status == 200
    assert srv.predict("swiss", {}).status == 200
    assert answered == []  # the slow ones are still waiting
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(path for path, _ in answered) == ["/sleepy", "/stuck"]
    for _, reply in answered:
        assert_error(
            reply,
            504,
            "GatewayTimeoutException",
            "did not answer within default_response_timeout (3 s)",
        )
    assert srv.request("GET", "/quick").status == 200
    log = (srv.log_dir / "ts_log.log").read_text()
    assert "plugin stuck: GET /stuck did not answer within default_response_timeout" in log


# --- start-up errors


@pytest.mark.daemon_errors(r"start-up failed: plugin my-ping: endpoint /ping would shadow")
def test_a_plugin_shadowing_ping_stops_the_start(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    write_plugin(folder, "shadow", SHADOW)
    srv = Server(tmp_path / "srv")
    result = srv.start(expect_ok=False, flags=("--plugins-path", str(folder)))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "tsctl: error: plugin my-ping: endpoint /ping would shadow the built-in route /ping "
        "of the inference API"
    ]
    assert not pidfile.pid_path(srv.state_dir).exists()  # no daemon left


# --- authorization


def test_token_authorization_applies_to_a_plugin_management_path(tmp_path: Path) -> None:
    site = install_example("stats_endpoint", tmp_path / "site")
    srv = Server(tmp_path / "srv")
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar", auth=True, env=_env(site))
    try:
        keys = json.loads((srv.root / "key_file.json").read_text())
        missing = srv.manage("GET", "/models/swiss/stats")
        assert_error(missing, 400, "InvalidKeyException", "Token Authorization failed")
        wrong = {"Authorization": f"Bearer {keys['inference']['key']}"}
        refused = srv.manage("GET", "/models/swiss/stats", headers=wrong)
        assert_error(refused, 400, "InvalidKeyException")
        right = {"Authorization": f"Bearer {keys['management']['key']}"}
        reply = srv.manage("GET", "/models/swiss/stats", headers=right)
        assert reply.status == 200 and reply.json()["modelName"] == "swiss"
    finally:
        srv.stop()
