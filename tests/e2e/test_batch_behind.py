"""At batch size 1 a busy worker gets its next request written behind the one it runs
(`pool._Chain`): what that must not change. Real daemon, real worker, real sockets."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


def _last_handler_ms(server: Server) -> float:
    """The handler time of the last batch (model_metrics.log, written before its answer)."""
    text = (server.log_dir / "model_metrics.log").read_text()
    return float(text.rpartition("HandlerTime.ms:")[2].partition("|")[0])


def test_a_request_behind_one_that_kills_the_worker_is_run_by_its_successor(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path)
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:
        marker = tmp_path / "busy"
        sleep = {"action": "sleep", "seconds": 1.0, "marker": str(marker)}
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(server.predict, "one", sleep)
            server.wait_for(marker.exists)  # the worker runs the first request
            short = pool.submit(server.predict, "one", {"action": "echo"})
            server.wait_for(lambda: server.queued("one") == 1)
            dies = pool.submit(server.predict, "one", {"action": "die"})
            server.wait_for(lambda: server.queued("one") == 2)
            behind = pool.submit(server.predict, "one", {"action": "echo"})
            server.wait_for(lambda: server.queued("one") == 3)
            # one worker: the first one's result sends the short echo and writes "die" behind
            # it; the echo's result starts "die" and writes the last echo behind that
            ran, died, served = first.result(60), dies.result(60), behind.result(60)
            assert short.result(60).status == 200
        assert ran.status == 200, ran.body
        assert died.status == 500, died.body
        assert "died" in died.json()["message"], died.body
        assert served.status == 200, served.body
        assert served.json()["pid"] != ran.json()["pid"]  # the successor ran it
        log = (server.log_dir / "ts_log.log").read_text()
        assert "died before the batch(es) behind its own; their 1 request(s) go back" in log
        # sent four times before the death (the fourth behind), and once more after it
        assert server.batches_sent("one") == 5
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr


def test_short_requests_queue_behind_in_the_socket_and_go_back_when_the_worker_dies(
    tmp_path: Path,
) -> None:
    """After a short request every ready one is written behind the one the worker runs (the
    work ahead of each is short), each its own batch; when the worker dies running one, all
    of those behind it go back to the queue, in order, and its successor answers them."""
    server = Server(tmp_path)
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:
        # until a request takes the handler well under BEHIND_MS / 4 (a fresh worker's first
        # ones are slower, and so are those run while the daemon starts a spare worker)
        warm = 0
        while warm < 500 and (warm < 10 or _last_handler_ms(server) > 0.5):
            pid = server.predict("one", {"action": "echo"}).json()["pid"]
            warm += 1
        os.kill(pid, signal.SIGSTOP)  # the next request is written to it and waits there
        with ThreadPoolExecutor(8) as pool:
            try:
                first = pool.submit(server.predict, "one", {"action": "echo"})
                server.wait_for(lambda: server.batches_sent("one") == warm + 1)
                dies = pool.submit(server.predict, "one", {"action": "die"})
                server.wait_for(lambda: server.queued("one") == 1)
                echoes = []
                for n in range(4):
                    echoes.append(pool.submit(server.predict, "one", {"n": n}))
                    server.wait_for(lambda n=n: server.queued("one") == 2 + n)
            finally:
                os.kill(pid, signal.SIGCONT)
            # the first echo's result sends "die" and writes the four echoes behind it
            assert first.result(60).status == 200
            died = dies.result(60)
            served = [echo.result(60) for echo in echoes]
        assert died.status == 500, died.body
        assert all(a.status == 200 for a in served), [a.body for a in served]
        assert [a.json()["values"]["body"]["n"] for a in served] == [0, 1, 2, 3]
        assert {a.json()["pid"] for a in served} != {pid}  # the successor ran them
        log = (server.log_dir / "ts_log.log").read_text()
        assert "died before the batch(es) behind its own; their 4 request(s) go back" in log
        # each its own batch: the warm ones and one before the stop, "die" and the 4 behind
        # it, the 4 again after it
        assert server.batches_sent("one") == warm + 10
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr


def test_a_request_is_not_sent_behind_a_long_one(tmp_path: Path) -> None:
    """With two workers, a request behind a long one would wait for it even if the other
    worker fell idle: it waits in the queue instead (sent behind only after a short request,
    `BEHIND_MS`)."""
    server = Server(tmp_path, properties={"default_workers_per_model": 2})
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:

        def sleep(seconds: float, marker: Path) -> dict[str, object]:
            return {"action": "sleep", "seconds": seconds, "marker": str(marker)}

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(server.predict, "one", sleep(1.0, tmp_path / "first"))
            server.wait_for((tmp_path / "first").exists)  # worker X
            other = pool.submit(server.predict, "one", sleep(1.5, tmp_path / "other"))
            server.wait_for((tmp_path / "other").exists)  # worker Y
            long = pool.submit(server.predict, "one", sleep(3.0, tmp_path / "long"))
            server.wait_for(lambda: server.queued("one") == 1)
            echo = pool.submit(server.predict, "one", {"action": "echo"})
            server.wait_for(lambda: server.queued("one") == 2)
            # X's first request (long) lands: X runs the 3 s one, the echo stays queued
            # and Y, free half a second later, runs it
            x, y = first.result(60).json()["pid"], other.result(60).json()["pid"]
            assert long.result(60).json()["pid"] == x
            answered = echo.result(60)
        assert answered.status == 200, answered.body
        assert answered.json()["pid"] == y
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr


def test_requests_sent_behind_each_get_their_own_answer_one_per_batch(tmp_path: Path) -> None:
    """(That requests are sent behind at all is shown by the death test above.)"""
    server = Server(tmp_path)
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: server.predict("one", {"n": i}), range(400)))
        assert all(a.status == 200 for a in answers), [a.status for a in answers]
        assert {a.json()["batch"] for a in answers} == {1}
        assert [a.json()["values"]["body"]["n"] for a in answers] == list(range(400))
        assert server.batches_sent("one") == 400
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr
