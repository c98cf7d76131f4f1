"""Per-model settings: a `model-config.yaml`'s keys, what a registration may override, and
the priority between them (API call > model-config.yaml > config.properties, TorchServe's).

Plain data and pure functions; `tsctl.server.registry` applies them when it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tsctl.errors import ArchiveError, BadRequest

#: TorchServe's `parallelType`s that start an instance's processes with torchrun: with `tp`
#: and `pptp` every rank runs every batch, with `pp` only rank 0 does
PARALLEL_TYPES = ("tp", "pp", "pptp")


class TorchrunSettings(BaseModel):
    """The `torchrun` section of a `model-config.yaml` (TorchServe's keys): how the processes
    of one model instance are started (`tsctl.server.workers.torchrun`)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    nnodes: int = Field(default=1, ge=1, le=1)  # an instance's ranks are on this machine
    nproc_per_node: int = Field(default=1, alias="nproc-per-node", ge=1, le=64)
    rdzv_backend: str = Field(default="c10d", alias="rdzv-backend", min_length=1)
    #: default: `localhost:0`, a free port per instance (TorchServe's default, 29400, would
    #: make two instances on one machine meet)
    rdzv_endpoint: str | None = Field(default=None, alias="rdzv-endpoint", min_length=1)
    rdzv_conf: str | None = Field(default=None, alias="rdzv-conf", min_length=1)
    monitor_interval: float | None = Field(default=None, alias="monitor-interval", gt=0)
    node_rank: int = Field(default=0, alias="node-rank", ge=0, le=0)
    #: each rank's OMP_NUM_THREADS (and torch threads)
    omp_number_threads: int = Field(default=1, alias="OMP_NUMBER_THREADS", ge=1)


class ModelSettings(BaseModel):
    """The frontend keys of a `model-config.yaml` (TorchServe's names) plus tsctl's own."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    min_workers: int | None = Field(default=None, alias="minWorkers", ge=0)
    max_workers: int | None = Field(default=None, alias="maxWorkers", ge=0)
    batch_size: int | None = Field(default=None, alias="batchSize", ge=1)
    max_batch_delay: float | None = Field(default=None, alias="maxBatchDelay", ge=0)
    response_timeout: float | None = Field(default=None, alias="responseTimeout", gt=0)
    startup_timeout: float | None = Field(default=None, alias="startupTimeout", gt=0)
    recycle_after_requests: int = Field(default=0, alias="recycleAfterRequests", ge=0)
    recycle_above_rss_mb: int = Field(default=0, alias="recycleAboveRssMb", ge=0)
    #: `cpu` keeps the model off GPUs; `gpu` (or unset) spreads its workers over them
    device_type: str | None = Field(default=None, alias="deviceType")
    #: the GPUs this model's workers take, round robin (default: every GPU of the server)
    device_ids: list[int] | None = Field(default=None, alias="deviceIds")
    #: stateful sessions (TorchServe's sequence batching: `tsctl.server.sessions`)
    sequence_batching: bool = Field(default=False, alias="sequenceBatching")
    continuous_batching: bool = Field(default=False, alias="continuousBatching")
    sequence_max_idle_msec: int = Field(default=0, alias="sequenceMaxIdleMSec", ge=0)
    sequence_timeout_msec: int = Field(default=0, alias="sequenceTimeoutMSec", ge=0)
    max_sequence_job_queue_size: int = Field(default=1, alias="maxSequenceJobQueueSize", ge=1)
    max_num_sequence: int = Field(default=1, alias="maxNumSequence", ge=1)
    #: who forms its batches: "default" (tsctl's, TorchServe's way) or a loaded batching
    #: strategy plugin's name (`tsctl.plugins`), with that strategy's own options
    batching_strategy: str | None = Field(default=None, alias="batchingStrategy", min_length=1)
    batching_options: dict[str, Any] | None = Field(default=None, alias="batchingOptions")
    #: one instance of several processes started by torchrun (`tsctl.server.workers.torchrun`):
    #: `parallelType`, and `parallelLevel` ranks (the `torchrun` section's nproc-per-node)
    parallel_type: str | None = Field(default=None, alias="parallelType")
    parallel_level: int | None = Field(default=None, alias="parallelLevel", ge=0, le=64)
    torchrun: TorchrunSettings | None = None
    #: TorchServe's `asyncCommunication`: an `async def handle` with several batches in
    #: flight in each worker, at most `maxBatchesInFlight` (tsctl's own; default: the
    #: server's `job_queue_size`, what the model's queue may hold)
    async_communication: bool | None = Field(default=None, alias="asyncCommunication")
    max_batches_in_flight: int | None = Field(default=None, alias="maxBatchesInFlight", ge=1)

    @field_validator("parallel_type")
    @classmethod
    def _known_parallel_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.lower() not in PARALLEL_TYPES:
            known = ", ".join(PARALLEL_TYPES)
            raise ValueError(f"{value!r} is not a parallelType tsctl runs (use one of {known})")
        return value.lower()


@dataclass(frozen=True)
class LoadOptions:
    """What a registration may override: API parameters win over model-config.yaml, which
    wins over config.properties (TorchServe's documented priority)."""

    name: str | None = None
    handler: str | None = None
    runtime: str | None = None
    batch_size: int | None = None
    max_batch_delay: float | None = None
    response_timeout: float | None = None
    startup_timeout: float | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    startup: bool = False
    #: operator-given paths (`--models`) may lie anywhere; API ones must be in the model store
    trusted: bool = False


def check_workers(setting: str, count: int | None, limit: int) -> None:
    """`BadRequest` naming `setting` if `count` workers are more than one model may have
    (`max_workers_per_model`)."""
    if count is not None and count > limit:
        raise BadRequest(
            f"{setting}={count} is over max_workers_per_model ({limit}), "
            "the most workers one model may have"
        )


def whole(value: float) -> float | int:
    """An int when the value is whole: TorchServe's JSON has `100`, not `100.0`."""
    return int(value) if float(value).is_integer() else value


def first(*values: Any) -> Any:
    """The first value that is not None (the priority order of settings)."""
    return next(v for v in values if v is not None)


def contained(model_dir: Path, name: str) -> Path:
    """The file the manifest names `name` in `model_dir`, refused (`ArchiveError`) unless it
    is inside that folder once `..` and links are resolved: an archive may only read what it
    ships."""
    root = model_dir.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        raise ArchiveError(f"configFile {name!r} is not a usable path: {exc}") from None
    if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
        raise ArchiveError(
            f"configFile {name!r} is outside the archive: it must name a file the archive ships"
        )
    return path


def read_yaml(model_dir: Path, config_file: str | None) -> dict[str, Any]:
    if not config_file:
        return {}
    import yaml

    path = contained(model_dir, config_file)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArchiveError(f"cannot read {config_file} in the archive: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ArchiveError(f"{config_file} in the archive is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ArchiveError(f"{config_file} in the archive is not UTF-8 text") from None
    except ValueError as exc:  # a scalar the loader converts: a date or an !!int that is neither
        raise ArchiveError(
            f"{config_file} in the archive has a value YAML cannot read: {exc}"
        ) from None
    except RecursionError:
        raise ArchiveError(f"{config_file} in the archive is nested too deeply") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ArchiveError(f"{config_file} in the archive must be a mapping of settings")
    return loaded
