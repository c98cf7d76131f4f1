"""`metrics_mode`, `metrics_config`, the system metrics, `LOG_LOCATION`/`METRICS_LOCATION` and
`async_logging`, on real daemons: which metric lands in which log file or on the metrics API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_tsctl
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

#: the default declarations' server metrics, and the `metered` handler's ImagesSeen (its
#: DecodeTime stays undeclared)
METRICS_YAML = """
ts_metrics:
  counter:
    - {name: Requests2XX, unit: Count, dimensions: [Level, Hostname]}
    - {name: ts_inference_requests_total, unit: Count,
       dimensions: [model_name, model_version, hostname]}
  gauge:
    - {name: QueueTime, unit: Milliseconds, dimensions: [Level, Hostname]}
    - {name: CPUUtilization, unit: Percent, dimensions: [Level, Hostname]}
    - {name: MemoryUsed, unit: Megabytes, dimensions: [Level, Hostname]}
model_metrics:
  counter:
    - {name: ImagesSeen, unit: count, dimensions: [Source, ModelName, Level]}
  gauge:
    - {name: HandlerTime, unit: ms, dimensions: [ModelName, Level]}
"""


def served(tmp_path: Path, **properties: str) -> Server:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "metrics.yaml"
    config.write_text(METRICS_YAML)
    server = Server(tmp_path, properties={"metrics_config": str(config), **properties})
    make_archive(server.store, "metered", "metered")
    server.start("metered.mar")
    assert server.predict("metered", {}).status == 200
    return server


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_log_mode_writes_torchserve_lines(tmp_path: Path) -> None:
    server = served(tmp_path)
    try:
        two_xx = r" - Requests2XX\.Count:1\.0\|#Level:Host\|#hostname:\S+,timestamp:\d+$"
        # the status is counted once the answer is written: the client may read first
        server.wait_for(lambda: re.search(two_xx, text(server.log_dir / "ts_metrics.log"), re.M))
        ts_metrics = text(server.log_dir / "ts_metrics.log")
        assert re.search(two_xx, ts_metrics, re.M), ts_metrics
        assert re.search(
            r" - ts_inference_requests_total\.Count:1\.0\|#model_name:metered,model_version:1\.0"
            r"\|#hostname:\S+,timestamp:\d+$",
            ts_metrics,
            re.M,
        )
        assert "CPUUtilization.Percent:" in ts_metrics  # sampled at start-up
        assert "WorkerThreadTime" not in ts_metrics  # not declared: not recorded
        model_metrics = text(server.log_dir / "model_metrics.log")
        assert re.search(
            r" - ImagesSeen\.count:1\.0\|#Source:test,ModelName:metered,Level:Model"
            r"\|#hostname:\S+,requestID:[\w-]+,timestamp:\d+$",
            model_metrics,
            re.M,
        ), model_metrics
        assert "HandlerTime.ms:" in model_metrics
        assert "DecodeTime" not in model_metrics  # not declared, no auto-detection
        assert "handler metric DecodeTime is not declared" in text(server.log_dir / "ts_log.log")
        # tsctl serves the declared metrics on the API in log mode too
        assert "Requests2XX{" in server.metrics_text()
    finally:
        server.stop()


def test_prometheus_mode_writes_no_metric_lines(tmp_path: Path) -> None:
    server = served(tmp_path, metrics_mode="prometheus")
    try:
        api = server.metrics_text()
        images = 'ImagesSeen{Source="test",ModelName="metered",Level="Model",'
        for name in ("Requests2XX{", "ts_inference_requests_total{", "CPUUtilization{", images):
            assert name in api, name
        assert "DecodeTime" not in api
    finally:
        server.stop()
    assert text(server.log_dir / "ts_metrics.log") == ""
    assert text(server.log_dir / "model_metrics.log") == ""


def test_legacy_mode_splits_them(tmp_path: Path) -> None:
    server = served(tmp_path, metrics_mode="legacy")
    try:
        api = server.metrics_text()
        assert "ts_inference_requests_total{" in api
        for name in ("Requests2XX", "CPUUtilization", "ImagesSeen", "HandlerTime"):
            assert name not in api, name
        assert "tsctl_batch_size" in api  # tsctl's own families: always on the API
        ts_metrics = text(server.log_dir / "ts_metrics.log")
        assert "Requests2XX.Count:1.0" in ts_metrics
        assert "ts_inference_requests_total" not in ts_metrics
        assert "ImagesSeen.count:1.0" in text(server.log_dir / "model_metrics.log")
    finally:
        server.stop()


def test_auto_detect_keeps_undeclared_handler_metrics(tmp_path: Path) -> None:
    server = served(tmp_path, model_metrics_auto_detect="true", metrics_mode="prometheus")
    try:
        series = r'^DecodeTime\{ModelName="metered",Level="Model",Hostname="[^"]+",\} 12\.5$'
        assert re.search(series, server.metrics_text(), re.M)
    finally:
        server.stop()


def test_system_metrics_every_interval_and_off(tmp_path: Path) -> None:
    server = served(tmp_path / "on", metric_time_interval="0.2")
    try:
        path = server.log_dir / "ts_metrics.log"
        server.wait_for(lambda: text(path).count("MemoryUsed.Megabytes:") >= 3)
    finally:
        server.stop()
    off = served(tmp_path / "off", disable_system_metrics="true")
    off.stop()
    ts_metrics = text(off.log_dir / "ts_metrics.log")
    assert "Requests2XX.Count:1.0" in ts_metrics
    assert "CPUUtilization" not in ts_metrics and "MemoryUsed" not in ts_metrics


def test_async_logging_writes_the_lines_soon(tmp_path: Path) -> None:
    server = served(tmp_path, async_logging="true")
    try:
        server.wait_for(lambda: "Requests2XX" in text(server.log_dir / "ts_metrics.log"))
    finally:
        server.stop()


def test_async_logging_not_a_boolean_is_false(tmp_path: Path) -> None:
    server = served(tmp_path, async_logging="2")  # TorchServe's own test: the start goes on
    server.stop()
    assert "Requests2XX.Count:1.0" in text(server.log_dir / "ts_metrics.log")


def test_log_and_metrics_location(tmp_path: Path) -> None:
    logs, metrics = tmp_path / "logs-here", tmp_path / "metrics-here"
    make_archive(tmp_path / "store", "metered", "metered")
    (tmp_path / "config.properties").write_text(
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n"
        "metrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\ngrpc_oip_port=0\n"
        "default_workers_per_model=1\n"
    )
    server = Server(tmp_path)
    started = run_tsctl(
        "serve", "start", "--model-store", tmp_path / "store", "--models", "metered.mar",
        "--ts-config", tmp_path / "config.properties", "--disable-token-auth",
        "--state-dir", server.state_dir,
        cwd=tmp_path, env={"LOG_LOCATION": str(logs), "METRICS_LOCATION": str(metrics)},
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    server.stop()
    assert sorted(p.name for p in logs.glob("*.log")) == [
        "access_log.log",
        "model_log.log",
        "ts_log.log",
    ]
    assert sorted(p.name for p in metrics.glob("*.log")) == ["model_metrics.log", "ts_metrics.log"]
    assert list((logs / "config").glob("*-startup.cfg"))  # snapshots follow the log folder
    assert not (tmp_path / "logs").exists()


@pytest.mark.daemon_errors("metrics_config .* is not valid YAML")
def test_a_broken_metrics_config_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ts_metrics: [unclosed\n")
    server = Server(tmp_path, properties={"metrics_config": str(bad)})
    result = server.start(expect_ok=False)
    assert result.returncode != 0
    assert f"metrics_config {bad} is not valid YAML" in result.stderr


def test_an_unknown_metrics_mode_is_refused(tmp_path: Path) -> None:
    server = Server(tmp_path, properties={"metrics_mode": "statsd"})
    assert_user_error(server.start(expect_ok=False), "metrics_mode")


def test_log_location_alone_leaves_the_metrics_in_logs(tmp_path: Path) -> None:
    """TorchServe's rule: without METRICS_LOCATION the metric logs stay in ./logs."""
    make_archive(tmp_path / "store", "metered", "metered")
    (tmp_path / "config.properties").write_text(
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n"
        "metrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\ngrpc_oip_port=0\n"
        "default_workers_per_model=0\n"
    )
    server = Server(tmp_path)
    started = run_tsctl(
        "serve", "start", "--model-store", tmp_path / "store", "--ncs",
        "--ts-config", tmp_path / "config.properties", "--disable-token-auth",
        "--state-dir", server.state_dir,
        cwd=tmp_path, env={"LOG_LOCATION": str(tmp_path / "elsewhere")},
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    server.stop()
    assert (tmp_path / "elsewhere" / "ts_log.log").exists()
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == [
        "model_metrics.log",
        "ts_metrics.log",
    ]
