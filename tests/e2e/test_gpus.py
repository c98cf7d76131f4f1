"""GPU selection without GPUs: how many the server sees, and which `gpu_id` each worker gets.

The machines the tests run on have no GPU, so these check the decisions (the driver's device
list and `CUDA_VISIBLE_DEVICES` read as CUDA reads them; TorchServe's round robin) on the
registry itself; the worker passes `gpu_id` to the handler's context unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tsctl.errors import ArchiveError
from tsctl.server.config import ServerConfig, build_config, visible_gpus
from tsctl.server.registry import Registry
from tsctl.server.settings import ModelSettings


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    """A stand-in for /proc/driver/nvidia/gpus with two GPUs."""
    folder = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (folder / bus).mkdir(parents=True)
    return folder


def test_visible_gpus(driver: Path, tmp_path: Path) -> None:
    assert visible_gpus({}, driver) == 2
    assert visible_gpus({}, tmp_path / "no-driver") == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}, driver) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, driver) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, driver) == 1  # CUDA stops at -1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, driver) == 2


def test_number_of_gpu_is_at_most_what_the_machine_has() -> None:
    seen = visible_gpus({})  # 0 on these machines; whatever the machine has elsewhere
    assert build_config({}, {}, {}).number_of_gpu == seen
    assert build_config({"number_of_gpu": "64"}, {}, {}).number_of_gpu == min(64, seen)
    assert build_config({"number_of_gpu": "0"}, {}, {}).number_of_gpu == 0


def _chooser(gpus: int, registry: Registry | None = None, **yaml: object) -> list[int | None]:
    registry = registry or Registry(ServerConfig(number_of_gpu=gpus))
    next_gpu = registry._gpu_chooser(ModelSettings.model_validate(yaml))
    return [next_gpu() for _ in range(5)]


def test_workers_take_gpus_round_robin_across_the_server() -> None:
    registry = Registry(ServerConfig(number_of_gpu=2))
    first = registry._gpu_chooser(ModelSettings())
    second = registry._gpu_chooser(ModelSettings())
    # one counter for the whole server, as in TorchServe: models interleave
    assert [first(), first(), second(), first()] == [0, 1, 0, 1]
    assert _chooser(0) == [None] * 5  # no GPU: every worker on the CPU
    assert _chooser(2, deviceType="cpu") == [None] * 5
    assert _chooser(4, deviceIds=[3, 1]) == [3, 1, 3, 1, 3]


def test_unknown_device_id_names_it() -> None:
    with pytest.raises(ArchiveError, match="deviceIds: GPU 2 does not exist"):
        _chooser(2, deviceIds=[0, 2])
