"""How a multi-process (torchrun) model's instances are launched, without starting them:
the settings checked at load, each instance's GPUs, environment and torchrun command, and an
instance's folder whose socket path a Unix socket could not bind."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tsctl.errors import WorkerStartFailed
from tsctl.ipc.messages import WorkerSpec
from tsctl.server.settings import ModelSettings
from tsctl.server.workers.torchrun import MAX_SOCKET_PATH, Instance, launcher

RANKS = 4
TP = {"parallelType": "tp", "deviceType": "cpu", "torchrun": {"nproc-per-node": RANKS}}


def test_settings_are_checked_when_the_model_loads() -> None:
    def settings(**doc: Any) -> ModelSettings:
        return ModelSettings.model_validate(doc)

    assert launcher("m", settings(), 0) is None
    made = launcher("m", settings(parallelType="pp", parallelLevel=2), 0)
    assert made is not None and made.level == 2 and made.next_devices() == ()
    gpus = launcher("m", settings(**{**TP, "deviceType": "gpu"}), 8)
    assert gpus is not None
    assert [gpus.next_devices() for _ in range(3)] == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)]
    ids = launcher("m", settings(parallelLevel=2, deviceIds=[3, 1, 2]), 4)
    assert ids is not None and [ids.next_devices() for _ in range(2)] == [(3, 1), (3, 1)]
    with pytest.raises(Exception, match="each instance has 4 ranks, one GPU each"):
        launcher("m", settings(**{**TP, "deviceType": "gpu"}), 2)
    with pytest.raises(Exception, match="parallelLevel 2 and torchrun nproc-per-node 4 differ"):
        launcher("m", settings(**TP, parallelLevel=2), 0)
    with pytest.raises(Exception, match="not a parallelType tsctl runs"):
        settings(parallelType="custom")
    with pytest.raises(Exception, match="less than or equal to 1"):
        settings(torchrun={"nnodes": 2})


def test_an_instance_on_gpus_sees_its_own_and_runs_torchrun_from_this_interpreter() -> None:
    torchrun = launcher("m", ModelSettings.model_validate({**TP, "deviceType": "gpu"}), 8)
    assert torchrun is not None
    make = torchrun.factory(lambda: WorkerSpec("m", "/models/m", "handler"))
    make("1-m")  # the first instance takes GPUs 0-3
    worker = make("2-m")
    spec = worker.spec
    assert (spec.gpu_id, spec.parallel_type, spec.parallel_level, spec.threads) == (4, "tp", 4, 1)
    assert isinstance(worker.launcher, Instance)
    env = torchrun.environment(worker.launcher.devices)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["OMP_NUM_THREADS"] == "1"
    command = torchrun.command(spec, Path("/run/r.sock"), Path("/run/logs"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--max-restarts") + 1] == "0"
    assert command[command.index("--rdzv-endpoint") + 1] == "localhost:0"
    assert command[-5:] == ["-m", "tsctl.worker", "0", "--ranks", "/run/r.sock"]


def test_a_relay_path_too_long_for_a_unix_socket_fails_the_start_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # as TMPDIR=deep would
    torchrun = launcher("m", ModelSettings.model_validate(TP), 0)
    assert torchrun is not None
    worker = torchrun.factory(lambda: WorkerSpec("m", "/models/m", "handler"))("1-m")
    assert isinstance(worker.launcher, Instance)
    with pytest.raises(WorkerStartFailed, match="set TMPDIR to a shorter folder"):
        worker.launcher.spawn()
    assert list(deep.iterdir()) == []  # its folder is gone, nothing was started
