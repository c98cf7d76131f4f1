"""Registered models: names, versions, the default version, and each version's queue and pool.

Runs on the daemon's event loop. Loading a model extracts its archive (in a thread: it is
blocking file I/O), reads its `model-config.yaml`, and starts its workers.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tsctl.archive.manifest import check_model_name, check_model_version
from tsctl.archive.reader import ArchiveKind, open_archive
from tsctl.errors import (
    ArchiveError,
    BadRequest,
    Conflict,
    InvalidInput,
    ModelNotFound,
    ModelVersionNotFound,
    ServiceUnavailable,
)
from tsctl.ipc.messages import WorkerSpec
from tsctl.plugins.api import BatchingStrategy
from tsctl.server.batching import DefaultBatching, ModelQueue
from tsctl.server.config import ServerConfig
from tsctl.server.deps import install as model_deps
from tsctl.server.sessions import Sessions, SessionSettings
from tsctl.server.settings import (
    LoadOptions,
    ModelSettings,
    check_workers,
    first,
    read_yaml,
    whole,
)
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.inflight import AsyncWorkerProcess
from tsctl.server.workers.pool import PoolSettings, WorkerPool
from tsctl.server.workers.process import WorkerProcess
from tsctl.server.workers.spares import Spares, cpu_count
from tsctl.server.workers.torchrun import launcher as torchrun_launcher
from tsctl.validation import first_problem

log = logging.getLogger("tsctl.server")
#: a registration that overrides nothing
DEFAULTS = LoadOptions()


@dataclass
class ModelVersion:
    name: str
    version: str
    url: str
    model_dir: Path
    manifest: dict[str, Any]
    yaml_config: dict[str, Any]
    batch_size: int
    max_batch_delay: float
    response_timeout: float
    startup_timeout: float
    min_workers: int
    max_workers: int
    queue: ModelQueue
    pool: WorkerPool
    #: what each worker of this version is assigned (the pool's worker factory reads it)
    worker_spec: WorkerSpec
    extracted: bool = False
    loaded_at_startup: bool = False

    def settings(self) -> dict[str, Any]:
        """The frontend settings, under TorchServe's names (describe output, snapshots)."""
        return {
            "minWorkers": self.pool.target,
            "maxWorkers": max(self.max_workers, self.pool.target),
            "batchSize": self.batch_size,
            "maxBatchDelay": whole(self.max_batch_delay),
            "responseTimeout": whole(self.response_timeout),
            "startupTimeout": whole(self.startup_timeout),
        }


def configured_settings(config: ServerConfig, name: str, version: str) -> ModelSettings:
    """The `models` setting's entry for one model version (TorchServe's per-model
    configuration, e.g. `{"noop": {"1.0": {"minWorkers": 1}}}`); empty when it has none."""
    entry = config.models.get(name, {}).get(version, {})
    try:
        return ModelSettings.model_validate(entry)
    except ValidationError as exc:
        where, problem = first_problem(exc)
        raise InvalidInput(f"models setting: {name} {version}: {where}: {problem}") from None


def inside_store(store: Path, named: Path) -> bool:
    """Whether the path a client named (relative to `store`, or absolute) is inside `store`.
    Lexical: links are not resolved, and `..` is refused wherever it is (the model and the
    workflow store's rule)."""
    root = Path(os.path.abspath(store))
    return ".." not in named.parts and Path(os.path.abspath(store / named)).is_relative_to(root)


@dataclass
class Registry:
    """Models by name, then version; `default[name]` is the version `/predictions/name` uses."""

    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    default: dict[str, str] = field(default_factory=dict)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tsctl-models-")))
    #: workers started ahead of start-up, taken by the first workers the pools start
    spares: Spares = field(default_factory=Spares)
    #: the batching strategy plugins by name (`ServerPlugins.strategies`): what a model's
    #: `batchingStrategy` may name besides "default"
    strategies: Mapping[str, BatchingStrategy] = field(default_factory=dict)
    #: the server-wide GPU round robin: the n-th worker started on a GPU takes GPU n mod count
    _gpu_turns: Iterator[int] = field(default_factory=itertools.count)

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(f"Model not found: {name}")
        if version is None:
            return versions[self.default[name]]
        found = versions.get(version)
        if found is None:
            raise ModelVersionNotFound(f"Model version: {version} does not exist for model: {name}")
        return found

    def total_workers(self) -> int:
        """Workers running or planned (a registered model's `min_workers` counts before its
        workers start), to share the machine's cores among them."""
        return sum(
            max(mv.pool.target, mv.min_workers) for vs in self.models.values() for mv in vs.values()
        )

    async def load(
        self, url: str, options: LoadOptions = DEFAULTS, *, new_name: bool = False
    ) -> ModelVersion:
        """Open, extract and register a model archive, then start its workers."""
        mv = await self.add(url, options, new_name=new_name)
        try:
            await mv.pool.scale(mv.min_workers)
        except BaseException:
            await self.unload(mv)
            raise
        return mv

    async def add(
        self, url: str, options: LoadOptions = DEFAULTS, *, new_name: bool = False
    ) -> ModelVersion:
        """Open, extract and register a model archive, with no workers yet; `new_name`: a
        Conflict when any version of that name is registered (a workflow's models)."""
        path = self.resolve(url, options.trusted)
        mv = await asyncio.to_thread(self._prepare, path, url, options)

        def refuse_a_duplicate() -> None:
            if new_name and mv.name in self.models:
                raise Conflict(f"Model {mv.name} is already registered")
            if mv.version in self.models.get(mv.name, {}):
                raise Conflict(
                    f"Model version {mv.version} is already registered for model {mv.name}"
                )

        try:
            refuse_a_duplicate()  # before pip, which may take up to install_py_dep_timeout
            dep_path = await model_deps.install(
                self.config,
                mv.name,
                mv.model_dir,
                mv.manifest["model"].get("requirementsFile"),
                self.work_dir,
            )
            refuse_a_duplicate()  # again: the same version may have been registered meanwhile
        except BaseException:
            self._discard(mv)
            raise
        mv.worker_spec = replace(mv.worker_spec, dep_path="" if dep_path is None else str(dep_path))
        mv.loaded_at_startup = options.startup
        self.models.setdefault(mv.name, {})[mv.version] = mv
        self.default.setdefault(mv.name, mv.version)
        return mv

    async def unregister(self, mv: ModelVersion, timeout: float) -> None:
        """Stop routing to `mv`, let its queued and running requests finish (up to
        `timeout` seconds), then stop its workers and forget it."""
        self._forget(mv)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (len(mv.queue) or mv.pool.busy()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self._stop(mv)

    def set_default(self, name: str, version: str) -> None:
        if version not in self.models.get(name, {}):
            self.get(name)  # an unknown model: `Model not found`
            # TorchServe's text for this call has no colons
            raise ModelVersionNotFound(f"Model version {version} does not exist for model {name}")
        self.default[name] = version

    async def unload(self, mv: ModelVersion) -> None:
        """Forget `mv` and stop its workers at once (queued requests get 503)."""
        self._forget(mv)
        await self._stop(mv)

    def _forget(self, mv: ModelVersion) -> None:
        """Stop routing requests to `mv`."""
        versions = self.models.get(mv.name, {})
        if versions.get(mv.version) is mv:
            del versions[mv.version]
        if not versions:
            self.models.pop(mv.name, None)
            self.default.pop(mv.name, None)
        elif self.default.get(mv.name) == mv.version:
            self.default[mv.name] = next(iter(versions))

    async def _stop(self, mv: ModelVersion) -> None:
        await mv.pool.close(ServiceUnavailable(f"model {mv.name} was unloaded"))
        self._discard(mv)

    async def close(self) -> None:
        for versions in list(self.models.values()):
            for mv in list(versions.values()):
                await self.unload(mv)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def resolve(self, url: str, trusted: bool = False) -> Path:
        """The archive a URL names. An untrusted (API) URL must name a path inside the model
        store: no `..` component, and an absolute one only below the store's own path. The
        rule is about the name a client sends, not where the store's entries point: symlinks
        an operator put in the store (a Kubernetes volume's `..data` link farm) are followed."""
        store = self.config.model_store
        named = Path(url.removeprefix("file://"))
        candidate = named
        if not candidate.is_absolute():
            if store is None:
                raise ModelNotFound(f"Model not found at: {url} (no model store is configured)")
            candidate = store / candidate
        if not trusted:
            if store is None:
                raise BadRequest(f"model url {url!r}: there is no model store to register from")
            if not inside_store(store, named):
                raise BadRequest(f"model url {url!r} is outside the model store")
        if not candidate.exists():
            raise ModelNotFound(f"Model not found at: {url}")
        return candidate

    def _prepare(self, path: Path, url: str, options: LoadOptions) -> ModelVersion:
        """Blocking part of loading: open and extract the archive, read its settings."""
        with open_archive(path) as archive:
            manifest = archive.manifest
            if archive.kind is ArchiveKind.DIRECTORY:
                model_dir, extracted = path.resolve(), False
            else:
                prefix = f"{manifest.model.model_name}-"
                target = Path(tempfile.mkdtemp(prefix=prefix, dir=self.work_dir))
                model_dir = archive.extract(target, self.config.max_archive_expanded_size)
                extracted = True
        model = manifest.model
        model_name = check_model_name(options.name or model.model_name)
        version = check_model_version(model.model_version or "1.0")
        yaml_config = read_yaml(model_dir, model.config_file)
        try:
            settings = ModelSettings.model_validate(yaml_config)
        except ValidationError as exc:
            where, problem = first_problem(exc)
            raise ArchiveError(f"{path}: model-config.yaml: {where}: {problem}") from None
        cfg = self.config
        configured = configured_settings(cfg, model_name, version)
        cap = cfg.max_workers_per_model
        check_workers("model-config.yaml minWorkers", settings.min_workers, cap)
        check_workers("model-config.yaml maxWorkers", settings.max_workers, cap)
        check_workers("minWorkers", options.min_workers, cap)
        check_workers("maxWorkers", options.max_workers, cap)
        check_workers(f"models setting {model_name} minWorkers", configured.min_workers, cap)
        check_workers(f"models setting {model_name} maxWorkers", configured.max_workers, cap)
        # API parameters > model-config.yaml > the `models` setting > config.properties
        min_workers = first(
            options.min_workers,
            settings.min_workers,
            configured.min_workers,
            min(cfg.default_workers_per_model, cap),
        )
        max_workers = first(
            options.max_workers, settings.max_workers, configured.max_workers, min_workers
        )
        batch_size = first(
            options.batch_size, settings.batch_size, configured.batch_size, cfg.batch_size
        )
        delay = first(
            options.max_batch_delay,
            settings.max_batch_delay,
            configured.max_batch_delay,
            cfg.max_batch_delay,
        )
        response_timeout = first(
            options.response_timeout,
            settings.response_timeout,
            configured.response_timeout,
            cfg.default_response_timeout,
        )
        startup_timeout = first(
            options.startup_timeout,
            settings.startup_timeout,
            configured.startup_timeout,
            cfg.default_startup_timeout,
        )
        handler = options.handler or model.handler
        # the strategy and its options come together from model-config.yaml, else the
        # `models` setting
        named = settings.batching_strategy or settings.batching_options is not None
        strategy = self._batching(model_name, settings if named else configured)
        queue = ModelQueue(cfg.job_queue_size)
        # several processes per instance (parallelType, torchrun): None for one
        torchrun = torchrun_launcher(model_name, settings, cfg.number_of_gpu)
        async_communication = bool(
            first(settings.async_communication, configured.async_communication, False)
        )
        if async_communication:
            _check_async(model_name, settings, torchrun is not None)
        if settings.sequence_batching:
            _sessions(model_name, settings, queue, batch_size, min_workers, max_workers)
        pool_settings = PoolSettings(
            batch_size=batch_size,
            max_batch_delay=delay,
            startup_timeout=startup_timeout,
            max_response_size=cfg.max_response_size,
            recycle_after_requests=settings.recycle_after_requests,
            recycle_above_rss_mb=settings.recycle_above_rss_mb,
            start_group=cpu_count(),
        )
        spec = WorkerSpec(
            model_name=model_name,
            model_dir=str(model_dir),
            handler=handler,
            manifest=manifest.to_dict(),
            batch_size=batch_size,
            model_yaml_config=yaml_config,
            limit_max_image_pixels=cfg.limit_max_image_pixels,
            startup_timeout=startup_timeout,
            service_envelope=cfg.service_envelope,
            declared_metrics=self.metrics.model_declarations(),
            async_communication=async_communication,
        )
        # asyncCommunication: batches in flight per worker (TorchServe sends all it has)
        in_flight = first(
            settings.max_batches_in_flight, configured.max_batches_in_flight, cfg.job_queue_size
        )
        pool = WorkerPool(
            f"{model_name}_{version}",
            (model_name, version),
            queue,
            pool_settings,
            # the spec as it is when a worker starts (`add` fills in its dependencies)
            self._worker_factory(lambda: mv.worker_spec, self._gpu_chooser(settings), in_flight)
            if torchrun is None
            else torchrun.factory(lambda: mv.worker_spec),
            self.metrics,
            strategy,
        )
        mv = ModelVersion(
            name=model_name,
            version=version,
            url=url,
            model_dir=model_dir,
            manifest=manifest.to_dict(),
            yaml_config=yaml_config,
            batch_size=batch_size,
            max_batch_delay=delay,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
            min_workers=min_workers,
            max_workers=max(max_workers, min_workers),
            queue=queue,
            pool=pool,
            extracted=extracted,
            worker_spec=spec,
        )
        return mv

    def _batching(self, model: str, settings: ModelSettings) -> BatchingStrategy:
        """The batching strategy `settings` name for `model` (`batchingStrategy`: "default" or
        a loaded plugin's name), made for it with its `batchingOptions`; `BadRequest` naming
        the model and the problem when the name is unknown or the strategy refuses its options.
        (In `_prepare`'s thread: `configure` only checks options and builds an instance.)"""
        name = settings.batching_strategy or DefaultBatching.name
        plugin = DefaultBatching() if name == DefaultBatching.name else self.strategies.get(name)
        where = f"model {model}: batchingStrategy {name}"
        if plugin is None:
            known = ", ".join(sorted({DefaultBatching.name, *self.strategies}))
            raise BadRequest(
                f"model {model}: batchingStrategy {name!r} is not a loaded batching strategy "
                f"(these are: {known})"
            )
        try:
            made = plugin.configure(dict(settings.batching_options or {}))
        except ValueError as exc:  # the strategy's own word on its options
            lines = str(exc).strip().splitlines()
            problem = lines[0] if lines else "refused (ValueError)"
            raise BadRequest(f"{where}: bad batchingOptions: {problem}") from None
        except Exception:
            log.exception("batching strategy %s failed to configure model %s", name, model)
            raise BadRequest(
                f"{where}: the strategy failed on its batchingOptions (see the server's log)"
            ) from None
        if not isinstance(made, BatchingStrategy):
            log.error("batching strategy %s: configure returned %s", name, type(made).__name__)
            raise BadRequest(
                f"{where}: the strategy could not be configured (see the server's log)"
            )
        return made

    def _worker_factory(
        self,
        spec: Callable[[], WorkerSpec],
        next_gpu: Callable[[], int | None],
        in_flight: int = 1,
    ) -> Callable[[str], WorkerProcess]:
        def make(worker_id: str) -> WorkerProcess:
            threads = self.config.worker_threads or max(
                1, cpu_count() // max(1, self.total_workers())
            )
            tune = not self.config.worker_threads  # the share, not a setting: tuned
            assigned = replace(
                spec(), worker_id=worker_id, threads=threads, tune_threads=tune, gpu_id=next_gpu()
            )
            if assigned.async_communication:
                return AsyncWorkerProcess(assigned, self.spares.take(), max_in_flight=in_flight)
            return WorkerProcess(assigned, self.spares.take())

        return make

    def _gpu_chooser(self, settings: ModelSettings) -> Callable[[], int | None]:
        """The `gpu_id` of each next worker of a model, as TorchServe assigns them: none on a
        machine without GPUs or for `deviceType: cpu`; else round robin over the model's
        `deviceIds`, or over every GPU with a counter the whole server shares."""
        gpus = self.config.number_of_gpu
        if gpus == 0 or (settings.device_type or "").lower() == "cpu":
            return lambda: None
        if settings.device_ids:
            unknown = [i for i in settings.device_ids if not 0 <= i < gpus]
            if unknown:
                raise ArchiveError(
                    f"model-config.yaml: deviceIds: GPU {unknown[0]} does not exist "
                    f"(this server uses {gpus}: 0 to {gpus - 1})"
                )
            return functools.partial(next, itertools.cycle(settings.device_ids))
        return lambda: next(self._gpu_turns) % gpus

    def _discard(self, mv: ModelVersion) -> None:
        if mv.extracted:
            shutil.rmtree(mv.model_dir, ignore_errors=True)


def _check_async(model: str, settings: ModelSettings, torchrun: bool) -> None:
    """Refuse what an `asyncCommunication` worker cannot run (`ArchiveError`, naming the keys):
    continuous batching (its streams are sent again with a worker's next batch, which only
    the one-batch-at-a-time loop does) and a torchrun instance (its ranks take one batch at a
    time)."""
    if settings.continuous_batching:
        raise ArchiveError(
            f"model {model}: asyncCommunication and continuousBatching cannot be used together "
            "in model-config.yaml (turn one of them off)"
        )
    if torchrun:
        raise ArchiveError(
            f"model {model}: asyncCommunication cannot be used with parallelType or torchrun "
            "in model-config.yaml (a multi-process instance takes one batch at a time)"
        )


def _sessions(
    model: str,
    settings: ModelSettings,
    queue: ModelQueue,
    batch_size: int,
    min_workers: int,
    max_workers: int,
) -> Sessions:
    """The stateful sessions of a model with `sequenceBatching: true`, on its queue."""
    if not settings.sequence_max_idle_msec:
        raise ArchiveError(
            f"model {model}: sequenceBatching needs sequenceMaxIdleMSec (over 0), how long "
            "a session may stay idle"
        )
    session_settings = SessionSettings.of(
        settings.sequence_max_idle_msec,
        settings.sequence_timeout_msec,
        settings.max_sequence_job_queue_size,
        settings.max_num_sequence,
        settings.continuous_batching,
        batch_size,
        min_workers,
        max(max_workers, min_workers),
    )
    return Sessions(model, session_settings, queue)
