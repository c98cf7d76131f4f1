"""The daemon's own log lines are buffered per event-loop turn, and metric series are bound
once: the lines and the metrics API read the same as when each update built its own text."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsctl.server.telemetry.declared import Declarations, MetricSpec
from tsctl.server.telemetry.logs import LineLog
from tsctl.server.telemetry.prometheus import HOSTNAME, Metrics

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d),(\d{3}) - (.*)$")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_off_the_loop_a_line_is_written_at_once(tmp_path: Path) -> None:
    log = LineLog(tmp_path / "a.log", delay=0)
    log.write("one")
    assert [LINE.match(line)[3] for line in lines(log.path)] == ["one"]  # type: ignore[index]
    log.close()


def test_on_the_loop_lines_are_written_at_the_end_of_the_turn_in_order(tmp_path: Path) -> None:
    log = LineLog(tmp_path / "a.log", delay=0)
    seen: list[list[str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(5):
            log.write(f"line {i}")
        assert lines(log.path) == []  # buffered: nothing written yet
        # what the writer schedules after its lines (the response) finds them written
        loop.call_soon(lambda: seen.append(lines(log.path)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert [LINE.match(line)[3] for line in seen[0]] == [f"line {i}" for i in range(5)]  # type: ignore[index]
    log.close()


def test_a_full_buffer_is_written_at_once(tmp_path: Path) -> None:
    log = LineLog(tmp_path / "a.log", delay=60)
    counted: list[int] = []

    async def main() -> None:
        for i in range(LineLog.MAX_LINES):
            log.write(f"{i}")
        counted.append(len(lines(log.path)))
        log.write("after")
        counted.append(len(lines(log.path)))

    asyncio.run(main())
    assert counted == [LineLog.MAX_LINES, LineLog.MAX_LINES]
    log.close()  # the timer never ran: close writes the rest
    assert lines(log.path)[-1].endswith(" - after")


def test_close_writes_lines_still_waiting_for_their_timer(tmp_path: Path) -> None:
    log = LineLog(tmp_path / "a.log", delay=60)

    async def main() -> None:
        log.write("first")
        log.write("second")
        assert lines(log.path) == []
        log.close()

    asyncio.run(main())
    assert [line.split(" - ", 1)[1] for line in lines(log.path)] == ["first", "second"]


def test_the_timestamp_and_the_metric_second_come_from_one_clock_reading(
    tmp_path: Path,
) -> None:
    log = LineLog(tmp_path / "m.log", delay=0)
    for _ in range(3):
        log.write_metric("Requests2XX.Count:", 1.0, "|#Level:Host|#hostname:h,timestamp:")
    for line in lines(log.path):
        match = LINE.match(line)
        assert match is not None
        head, second = match[3].rsplit(":", 1)
        assert head == "Requests2XX.Count:1.0|#Level:Host|#hostname:h,timestamp"
        local = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(second)))
        assert local == match[1]
    log.close()


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[tuple[LineLog, LineLog]]:
    server, model = LineLog(tmp_path / "ts.log", 0), LineLog(tmp_path / "model.log", 0)
    yield server, model
    server.close()
    model.close()


def bodies(path: Path) -> list[str]:
    return [line.split(" - ", 1)[1] for line in lines(path)]


def test_metric_lines_keep_torchserves_format(logs: tuple[LineLog, LineLog]) -> None:
    metrics = Metrics("log", server_log=logs[0], model_log=logs[1])
    bound = metrics.for_model("mlp", "1.0")
    bound.queue_latency.inc(12.5)
    bound.queue_time.set(3)
    metrics.count_status(200)
    metrics.count_status(503)
    for series in bound.handler_time():
        series.record(1.25, "rid-1")
    ts = r",timestamp:\d+$"
    expected = [
        rf"ts_queue_latency_microseconds\.Microseconds:12\.5\|#model_name:mlp,model_version:1\.0\|#hostname:{HOSTNAME}{ts}",
        rf"QueueTime\.Milliseconds:3\.0\|#Level:Host\|#hostname:{HOSTNAME}{ts}",
        rf"Requests2XX\.Count:1\.0\|#Level:Host\|#hostname:{HOSTNAME}{ts}",
        rf"Requests5XX\.Count:1\.0\|#Level:Host\|#hostname:{HOSTNAME}{ts}",
    ]
    got = bodies(logs[0].path)
    assert len(got) == len(expected)
    for line, pattern in zip(got, expected, strict=True):
        assert re.match(pattern, line), line
    for line, name in zip(bodies(logs[1].path), ("HandlerTime", "PredictionTime"), strict=True):
        dims = rf"#ModelName:mlp,Level:Model\|#hostname:{HOSTNAME}"
        pattern = rf"{name}\.ms:1\.25\|{dims},requestID:rid-1{ts}"
        assert re.match(pattern, line), line


def test_bound_series_are_the_ones_label_tuples_reach(logs: tuple[LineLog, LineLog]) -> None:
    metrics = Metrics("log", server_log=logs[0], model_log=logs[1])
    bound = metrics.for_model("mlp", "1.0")
    assert metrics.for_model("mlp", "1.0") is bound
    labels = ("mlp", "1.0", HOSTNAME)
    assert metrics.requests_total.series(list(labels)) is bound.requests_total
    bound.requests_total.inc()
    metrics.requests_total.inc(labels)
    bound.batch_size.observe(3)
    metrics.batch_size.observe(("mlp", "1.0"), 8)
    text = metrics.render()
    labels_text = f'model_name="mlp",model_version="1.0",hostname="{HOSTNAME}",'
    assert f"ts_inference_requests_total{{{labels_text}}} 2.0" in text
    assert 'tsctl_batch_size_bucket{model_name="mlp",model_version="1.0",le="4.0",} 1.0' in text
    assert 'tsctl_batch_size_count{model_name="mlp",model_version="1.0",} 2.0' in text
    assert 'tsctl_batch_size_sum{model_name="mlp",model_version="1.0",} 11.0' in text


def test_a_declared_counter_handler_time_is_counted(logs: tuple[LineLog, LineLog]) -> None:
    server, model = logs
    declared = Declarations(
        server={}, model={"HandlerTime": MetricSpec("HandlerTime", "counter", "ms", ("ModelName",))}
    )
    metrics = Metrics("log", declared, server_log=server, model_log=model)
    bound = metrics.for_model("mlp", "1.0")
    (handler_time,) = bound.handler_time()  # PredictionTime is not declared: not recorded
    handler_time.record(2.0)
    handler_time.record(3.0)
    assert f'HandlerTime{{ModelName="mlp",Hostname="{HOSTNAME}",}} 5.0' in metrics.render()
    assert len(bodies(model.path)) == 2


def test_histogram_buckets_count_values_up_to_their_bound(logs: tuple[LineLog, LineLog]) -> None:
    metrics = Metrics("log", server_log=logs[0], model_log=logs[1])
    series = metrics.batch_size.series(("m", "1"))
    for value in (1, 2, 3, 128, 200):
        series.observe(value)
    text = metrics.render()
    cumulated = {"1.0": 1, "2.0": 2, "4.0": 3, "64.0": 3, "128.0": 4, "+Inf": 5}
    for bound, count in cumulated.items():
        assert (
            f'tsctl_batch_size_bucket{{model_name="m",model_version="1",le="{bound}",}} {count}.0'
            in text
        )


def test_a_nan_observation_renders_as_prometheus_nan(logs: tuple[LineLog, LineLog]) -> None:
    """A handler may feed a histogram NaN; the metrics API must still render (it raised)."""
    metrics = Metrics("log", server_log=logs[0], model_log=logs[1])
    series = metrics.batch_size.series(("m", "1"))
    series.observe(float("nan"))
    series.observe(2)
    text = metrics.render()
    assert 'tsctl_batch_size_sum{model_name="m",model_version="1",} NaN' in text
    assert 'tsctl_batch_size_count{model_name="m",model_version="1",} 2.0' in text
