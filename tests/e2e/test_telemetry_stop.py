"""The daemon buffers its access-log and metric lines (written once per event-loop turn, or
shortly after): a stop right after the requests loses none of them."""

from __future__ import annotations

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
