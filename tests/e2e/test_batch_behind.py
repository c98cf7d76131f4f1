"""At batch size 1 a busy worker gets its next request written behind the one it runs
(`pool._Chain`): what that must not change. Real daemon, real worker, real sockets."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


def _batches_sent(server: Server) -> float:
    found = re.search(
        r'^tsctl_batch_size_count\{model_name="one",model_version="1.0",?\} (\S+)$',
        server.metrics_text(),
        re.MULTILINE,
    )
    assert found, "tsctl_batch_size not in the metrics"
    return float(found.group(1))


def test_a_request_behind_one_that_kills_the_worker_is_run_by_its_successor(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path)
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:
        marker = tmp_path / "busy"
        sleep = {"action": "sleep", "seconds": 1.0, "marker": str(marker)}
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(server.predict, "one", sleep)
            server.wait_for(marker.exists)  # the worker runs the first request
            dies = pool.submit(server.predict, "one", {"action": "die"})
            server.wait_for(lambda: server.queued("one") == 1)
            behind = pool.submit(server.predict, "one", {"action": "echo"})
            server.wait_for(lambda: server.queued("one") == 2)
            # the first one's result sends "die" and writes "echo" behind it
            ran, died, served = first.result(60), dies.result(60), behind.result(60)
        assert ran.status == 200, ran.body
        assert died.status == 500, died.body
        assert "died" in died.json()["message"], died.body
        assert served.status == 200, served.body
        assert served.json()["pid"] != ran.json()["pid"]  # the successor ran it
        log = (server.log_dir / "ts_log.log").read_text()
        assert "died before the batch behind its own; its 1 request(s) go back" in log
        # sent three times before the death (the third behind), and once more after it
        assert _batches_sent(server) == 4
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr


def test_requests_sent_behind_each_get_their_own_answer_one_per_batch(tmp_path: Path) -> None:
    server = Server(tmp_path)
    make_archive(server.store, "one", "swiss", config={"batchSize": 1})
    server.start("one.mar")
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: server.predict("one", {"n": i}), range(400)))
        assert all(a.status == 200 for a in answers), [a.status for a in answers]
        assert {a.json()["batch"] for a in answers} == {1}
        assert [a.json()["values"]["body"]["n"] for a in answers] == list(range(400))
        assert _batches_sent(server) == 400
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr
