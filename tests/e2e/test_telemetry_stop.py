"""The daemon buffers its access-log and metric lines (written once per event-loop turn, or
shortly after): a stop right after the requests loses none of them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

REQUESTS = 25


@pytest.mark.parametrize("async_logging", ["false", "true"])
def test_a_stop_right_after_requests_loses_no_line(tmp_path: Path, async_logging: str) -> None:
    server = Server(tmp_path, properties={"async_logging": async_logging})
    make_archive(server.store, "metered", "metered")
    server.start("metered.mar")
    for _ in range(REQUESTS):
        assert server.predict("metered", {}).status == 200
    result = server.stop()
    assert result.returncode == 0, result.stdout + result.stderr

    def count(name: str, needle: str) -> int:
        return (server.log_dir / name).read_text().count(needle)

    assert count("access_log.log", '"POST /predictions/metered HTTP/1.1" 200') == REQUESTS
    assert count("ts_metrics.log", "ts_inference_requests_total.Count:1.0|") == REQUESTS
    assert count("ts_metrics.log", "QueueTime.Milliseconds:") == REQUESTS  # one per batch
    assert count("model_metrics.log", "HandlerTime.ms:") == REQUESTS


def test_a_batchs_metric_lines_are_written_before_its_answer(tmp_path: Path) -> None:
    """Without async_logging a client that has its answer finds the batch's metric lines in
    the files already (TorchServe's own tests read model_metrics.log right after a request)."""
    server = Server(tmp_path)
    make_archive(server.store, "metered", "metered")
    server.start("metered.mar")
    model_log = server.log_dir / "model_metrics.log"
    server_log = server.log_dir / "ts_metrics.log"
    try:
        for n in range(1, 6):
            assert server.predict("metered", {}).status == 200
            # read at once, no waiting: the lines must be there when the answer is
            assert model_log.read_text().count("HandlerTime.ms:") == n
            assert server_log.read_text().count("QueueTime.Milliseconds:") == n
    finally:
        server.stop()


def test_each_answer_finds_its_metric_lines_under_concurrent_load(tmp_path: Path) -> None:
    """The same with many clients at batch size 1, where the worker gets requests behind the
    one it runs and the daemon reads several results at once (their lines are then written
    together, before the first of their answers): every client that has its answer finds the
    HandlerTime line of its own request in model_metrics.log."""
    server = Server(tmp_path)
    make_archive(server.store, "metered", "metered", config={"batchSize": 1})
    server.start("metered.mar")
    model_log = server.log_dir / "model_metrics.log"

    def ask(_: int) -> str:
        answer = server.predict("metered", {})
        assert answer.status == 200, answer.body
        request_id = answer.headers["x-request-id"]
        return request_id if f"requestID:{request_id}," in model_log.read_text() else ""

    try:
        with ThreadPoolExecutor(16) as pool:
            found = list(pool.map(ask, range(400)))
        assert all(found), f"{found.count('')} answers came before their metric lines"
    finally:
        server.stop()
