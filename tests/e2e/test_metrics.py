"""The metrics API, ts_metrics.log and model_metrics.log, with values that move."""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterator

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # the handler's metrics are not in the default metrics configuration: auto-detected
    properties = {"cors_allowed_origin": "*", "model_metrics_auto_detect": "true"}
    srv = Server(tmp_path_factory.mktemp("metrics"), properties=properties)
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "metered", "metered")
    srv.start("swiss.mar", "metered.mar")
    yield srv
    srv.stop()


def scrape(server: Server, query: str = "") -> str:
    assert server.info is not None
    host, port = server.info.metrics_address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", f"/metrics{query}")
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    text = reply.read().decode()
    conn.close()
    return text


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_request_metrics_move(server: Server) -> None:
    host = socket.gethostname()
    name = (
        f'ts_inference_requests_total{{model_name="swiss",model_version="1.0",hostname="{host}",}}'
    )
    start = value(scrape(server), name)
    for _ in range(3):
        assert server.predict("swiss", {}).status == 200
    server.predict("nosuchmodel", {})
    after = scrape(server)
    assert value(after, name) == start + 3
    assert "Requests4XX{" in after
    assert "ts_queue_latency_microseconds{" in after
    assert re.search(
        r'^tsctl_batch_size_count\{model_name="swiss",model_version="1.0",\} \d', after, re.M
    )


def test_name_filter(server: Server) -> None:
    server.predict("swiss", {})
    text = scrape(server, "?name[]=Requests2XX&name[]=tsctl_queue_depth")
    families = set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    assert families == {"Requests2XX", "tsctl_queue_depth"}


def test_handler_custom_metrics(server: Server) -> None:
    for _ in range(2):
        assert server.predict("metered", {}).status == 200
    text = scrape(server)
    assert re.search(
        r'^ImagesSeen\{Source="test",ModelName="metered",Level="Model",Hostname="[^"]+",\} 2\.0$',
        text,
        re.M,
    )
    assert re.search(
        r'^DecodeTime\{ModelName="metered",Level="Model",Hostname="[^"]+",\} 12\.5$', text, re.M
    )
    server.wait_for(
        lambda: (
            "ImagesSeen.count:1.0|#Source:test,ModelName:metered,Level:Model|#hostname:"
            in (server.log_dir / "model_metrics.log").read_text()
        )
    )


def test_worker_restarts_are_counted(server: Server) -> None:
    server.predict("swiss", {"action": "die"})
    assert server.predict("swiss", {}).status == 200
    assert re.search(
        r'^tsctl_worker_restarts_total\{model_name="swiss",model_version="1.0",\} [1-9]',
        scrape(server),
        re.M,
    )


def test_unknown_path(server: Server) -> None:
    assert server.info is not None
    host, port = server.info.metrics_address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/nothing")
    assert conn.getresponse().status == 404
    conn.close()


def test_cors_headers_when_configured(server: Server) -> None:
    assert server.predict("swiss", {}).headers["access-control-allow-origin"] == "*"
    assert server.request("GET", "/ping").headers["access-control-allow-origin"] == "*"
    assert server.manage("GET", "/models").headers["access-control-allow-origin"] == "*"
