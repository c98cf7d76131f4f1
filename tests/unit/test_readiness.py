"""`tsctl.server.readiness` on a real `ServerState` whose model versions hold worker objects
in the states a pool gives them (no processes are started: readiness only reads states)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tsctl.ipc.messages import WorkerSpec, WorkerState
from tsctl.server.batching import ModelQueue
from tsctl.server.config import ServerConfig
from tsctl.server.readiness import model_ready, server_live, server_ready
from tsctl.server.registry import ModelVersion, Registry
from tsctl.server.state import ServerState
from tsctl.server.telemetry.logs import LineLog
from tsctl.server.telemetry.metric_log import MetricLog
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.pool import PoolSettings, WorkerPool
from tsctl.server.workers.process import WorkerProcess


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    config = ServerConfig(log_dir=tmp_path, state_dir=tmp_path)
    metrics = Metrics()
    registry = Registry(config, metrics, work_dir=tmp_path / "work")
    access_log = LineLog(tmp_path / "access_log.log")
    yield ServerState(config, registry, metrics, MetricLog(tmp_path), access_log)
    access_log.close()


def add(
    state: ServerState,
    name: str,
    version: str = "1.0",
    workers: tuple[WorkerState, ...] = (),
    startup: bool = True,
    target: int = 1,
) -> ModelVersion:
    """Register `name` `version` with workers in the states given, as the pool lists them."""
    spec = WorkerSpec(model_name=name, model_dir="/nonexistent", handler="h")

    def no_new_workers(worker_id: str) -> WorkerProcess:
        raise AssertionError("readiness must not start workers")

    queue = ModelQueue(10)
    pool = WorkerPool(
        f"{name}_{version}",
        (name, version),
        queue,
        PoolSettings(batch_size=1, max_batch_delay=0, startup_timeout=1, max_response_size=1),
        no_new_workers,
        state.metrics,
    )
    pool.target = target
    for n, worker_state in enumerate(workers):
        worker = WorkerProcess(WorkerSpec(name, "/nonexistent", "h", worker_id=f"{n}"))
        worker.state = worker_state
        pool.workers.append(worker)
    mv = ModelVersion(
        name=name,
        version=version,
        url=f"{name}.mar",
        model_dir=Path("/nonexistent"),
        manifest={},
        yaml_config={},
        batch_size=1,
        max_batch_delay=0,
        response_timeout=1,
        startup_timeout=1,
        min_workers=target,
        max_workers=target,
        queue=queue,
        pool=pool,
        worker_spec=spec,
        loaded_at_startup=startup,
    )
    state.registry.models.setdefault(name, {})[version] = mv
    state.registry.default.setdefault(name, version)
    return mv


def test_an_empty_server_is_live_and_ready(state: ServerState) -> None:
    assert server_live(state)
    assert server_ready(state)


def test_not_ready_while_the_startup_models_load(state: ServerState) -> None:
    # before the first start-up model is even registered, the registry is empty
    state.loading_startup_models = True
    assert server_live(state)
    assert not server_ready(state)
    state.loading_startup_models = False
    assert server_ready(state)


def test_draining_is_neither_live_nor_ready(state: ServerState) -> None:
    add(state, "m", workers=(WorkerState.READY,))
    state.draining = True
    assert not server_live(state)
    assert not server_ready(state)
    assert not model_ready(state, "m")


@pytest.mark.parametrize("serving", [WorkerState.READY, WorkerState.BUSY])
def test_a_startup_model_with_a_serving_worker_is_ready(
    state: ServerState, serving: WorkerState
) -> None:
    add(state, "m", workers=(WorkerState.STARTING, serving))
    assert server_ready(state)
    assert model_ready(state, "m")
    assert model_ready(state, "m", "1.0")


@pytest.mark.parametrize(
    "workers",
    [
        (),
        (WorkerState.STARTING,),
        (WorkerState.RETIRING, WorkerState.STOPPING, WorkerState.DEAD),
    ],
)
def test_a_startup_model_without_a_serving_worker_is_not_ready(
    state: ServerState, workers: tuple[WorkerState, ...]
) -> None:
    add(state, "ok", workers=(WorkerState.READY,))
    add(state, "m", workers=workers)
    assert server_live(state)
    assert not server_ready(state)
    assert not model_ready(state, "m")
    assert model_ready(state, "ok")


def test_every_startup_version_counts_not_only_the_default(state: ServerState) -> None:
    add(state, "m", "1.0", workers=(WorkerState.READY,))
    add(state, "m", "2.0", workers=(WorkerState.STARTING,))
    assert not server_ready(state)
    assert model_ready(state, "m")  # the default version serves
    assert not model_ready(state, "m", "2.0")


def test_a_model_registered_later_does_not_hold_readiness(state: ServerState) -> None:
    add(state, "boot", workers=(WorkerState.READY,))
    add(state, "later", workers=(WorkerState.STARTING,), startup=False)
    assert server_ready(state)
    assert not model_ready(state, "later")


def test_a_startup_version_with_no_workers_planned_is_not_waited_for(
    state: ServerState,
) -> None:
    add(state, "idle", workers=(), target=0)
    assert server_ready(state)
    assert not model_ready(state, "idle")


def test_unknown_models_and_versions_are_not_ready(state: ServerState) -> None:
    add(state, "m", workers=(WorkerState.READY,))
    assert not model_ready(state, "nope")
    assert not model_ready(state, "m", "9.9")
    assert model_ready(state, "m", None)
    assert model_ready(state, "m", "")  # an empty version is the default one
