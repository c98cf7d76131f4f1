"""Nothing a client sends ends a worker, a worker that dies idle is replaced at once, and
responses stay within `max_response_size`: real daemons, real workers, real sockets."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemon import Response, Server, make_archive

pytestmark = pytest.mark.slow

LIMIT = 100_000  # the daemon's max_response_size
DEEP = b"[" * 200_000  # JSON nested far deeper than Python's recursion limit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("faults"), properties={"max_response_size": LIMIT})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "batched", "swiss", config={"batchSize": 4, "maxBatchDelay": 500})
    make_archive(srv.store, "sizer", "sizer")
    srv.start("swiss.mar", "batched.mar", "sizer.mar")
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr


def worker_pids(server: Server, model: str) -> list[int]:
    described = server.manage("GET", f"/models/{model}").json()[0]["workers"]
    return [w["pid"] for w in described]


def assert_error(response: Response, status: int, *needles: str) -> None:
    assert response.status == status, (response.status, response.body[:300])
    message = response.json()["message"]
    for needle in needles:
        assert needle in message, message


def test_deeply_nested_json_gets_400_and_the_worker_lives_on(server: Server) -> None:
    [pid] = worker_pids(server, "swiss")
    deep = server.predict("swiss", DEEP, headers={"Content-Type": "application/json"})
    assert_error(deep, 400, "'body'", "nested too deeply")
    after = server.predict("swiss", {"action": "echo"})
    assert after.status == 200 and after.json()["pid"] == pid
    assert worker_pids(server, "swiss") == [pid]


def test_deeply_nested_json_fails_alone_in_its_batch(server: Server) -> None:
    [pid] = worker_pids(server, "batched")
    bodies = [(b'{"action": "echo"}', "good")] * 3 + [(DEEP, "deep")]

    def send(item: tuple[bytes, str]) -> tuple[str, Response]:
        body, what = item
        headers = {"Content-Type": "application/json"}
        return what, server.predict("batched", body, headers=headers)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, bodies))
    for what, response in answers:
        if what == "deep":
            assert_error(response, 400, "nested too deeply")
        else:
            assert response.status == 200, response.body
            assert response.json()["pid"] == pid
    assert worker_pids(server, "batched") == [pid]


def test_field_names_too_large_for_a_worker_frame_are_refused_alone(server: Server) -> None:
    [pid] = worker_pids(server, "swiss")
    # each control character of a field name is a 6-byte escape in the frame's JSON meta:
    # this 3 MB body (under max_request_size) would make 18 MB of meta, over the 16 MiB bound
    body = b"\x01" * 3_000_000 + b"=1"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = server.predict("swiss", body, headers=form)
    assert_error(refused, 413, "input names and headers", "worker frame", "limit of")
    after = server.predict("swiss", {"action": "echo"})
    assert after.status == 200 and after.json()["pid"] == pid


def test_a_response_over_max_response_size_is_refused(server: Server) -> None:
    [pid] = worker_pids(server, "sizer")
    big = server.predict("sizer", {"size": LIMIT + 1})
    assert_error(big, 503, f"the response of {LIMIT + 1} bytes exceeds max_response_size")
    exact = server.predict("sizer", {"size": LIMIT})
    assert exact.status == 200 and exact.body == b"\x07" * LIMIT
    assert server.predict("sizer", {}).body.decode() == str(pid)  # the same worker


def test_a_stream_over_max_response_size_ends_with_an_error(server: Server) -> None:
    # 5 chunks of 30,000 bytes: the fourth takes the stream past the limit
    streamed = server.predict("sizer", {"size": 30_000, "chunks": 5})
    assert streamed.status == 200  # sent with the first chunk
    assert streamed.body.count(b"\x07") == 90_000
    tail = json.loads(streamed.body.lstrip(b"\x07"))
    assert "exceeds max_response_size" in tail["message"]
    within = server.predict("sizer", {"size": 30_000, "chunks": 3})
    assert within.body == b"\x07" * 90_000 + b"end"


def test_a_worker_killed_while_idle_is_replaced_and_stop_is_prompt(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "other", "swiss")
    srv.start("swiss.mar", "other.mar", ncs=False)
    try:
        [old] = worker_pids(srv, "swiss")
        [other] = worker_pids(srv, "other")
        os.kill(old, signal.SIGKILL)
        # no request is sent: the daemon notices the exit by itself
        srv.wait_for(lambda: worker_pids(srv, "swiss") not in ([], [old]))
        [new] = worker_pids(srv, "swiss")
        assert Path(f"/proc/{new}").exists()
        os.kill(other, signal.SIGKILL)  # and one left dead until stop
    finally:
        stopped = srv.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "tsctl stopped" in stopped.stdout  # it exited by itself: drained, not killed
    snapshots = sorted((srv.log_dir / "config").glob("*.cfg"))
    assert snapshots and snapshots[-1].name.endswith("-shutdown.cfg")
