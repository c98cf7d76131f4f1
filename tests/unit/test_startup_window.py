"""While the start-up models are being registered, a prediction for a model not known yet is
answered 503 with Retry-After (a proxy retries it; a 404 would be wrong a moment later), and
404 once start-up is over."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsctl.errors import ModelNotFound, StartingUp
from tsctl.server.api.rest import error_response
from tsctl.server.config import ServerConfig
from tsctl.server.registry import Registry
from tsctl.server.state import ServerState
from tsctl.server.telemetry.logs import LineLog
from tsctl.server.telemetry.metric_log import MetricLog
from tsctl.server.telemetry.prometheus import Metrics


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    config = ServerConfig(log_dir=tmp_path, state_dir=tmp_path)
    metrics = Metrics()
    registry = Registry(config, metrics, work_dir=tmp_path / "work")
    access_log = LineLog(tmp_path / "access_log.log")
    yield ServerState(config, registry, metrics, MetricLog(tmp_path), access_log)
    access_log.close()


def test_unknown_model_while_loading_is_503_with_retry_after(state: ServerState) -> None:
    state.loading_startup_models = True
    with pytest.raises(StartingUp) as caught:
        state.model_for_inference("mnist", None)
    status, body, headers = error_response(caught.value)
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert "still loading" in json.loads(body)["message"]
    assert caught.value.grpc_code == "UNAVAILABLE"


def test_unknown_model_after_start_up_is_404(state: ServerState) -> None:
    state.loading_startup_models = False
    with pytest.raises(ModelNotFound) as caught:
        state.model_for_inference("mnist", None)
    status, _, headers = error_response(caught.value)
    assert status == 404
    assert "Retry-After" not in headers
