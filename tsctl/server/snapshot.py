"""Config snapshots in TorchServe's format and place, so the last state survives a restart.

`<log_dir>/config/<yyyyMMddHHmmssSSS>-<startup|snapshot|shutdown>.cfg` holds the server's
properties (every setting given a value of its own: addresses and ports included) plus
`model_snapshot`, a JSON object of every model version with its settings. Files are written
atomically (temporary file, fsync, rename), so a daemon killed at any moment leaves either the
previous snapshot or the new one, never half of one.

Started without `--ts-config` (and without `--ncs`), the server takes the newest snapshot that
parses as its configuration, as TorchServe does: its properties, then the command line's flags
on top (`startup_properties`, called by `tsctl serve start` before the daemon exists). A corrupt
snapshot is reported and skipped. The daemon calls the writers from its event loop: the files
are small and the writes quick.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsctl.errors import TsctlError
from tsctl.server.config import ServerConfig, property_line, read_properties, unknown_keys
from tsctl.server.settings import LoadOptions

if TYPE_CHECKING:
    from tsctl.server.registry import Registry

log = logging.getLogger("tsctl.server")

KINDS = ("startup", "snapshot", "shutdown")
#: server properties a snapshot always records (TorchServe's keys), set or not
_ALWAYS = (
    "inference_address",
    "management_address",
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "default_response_timeout",
    "default_startup_timeout",
    "enable_model_api",
)
#: settings a snapshot never records: the models (`model_snapshot` has them), what each start
#: works out again (`number_of_gpu`), and a secret that must not sit in the log folder
_NOT_RECORDED = {"load_models", "models", "model_store", "number_of_gpu", "keystore_pass"}


def recorded(config: ServerConfig) -> list[tuple[str, str]]:
    """(key, value) of each property a snapshot records: `_ALWAYS`, then every other
    config.properties setting whose value is not its default."""
    values = config.model_dump(mode="json")
    keys = list(_ALWAYS)
    for name, info in ServerConfig.model_fields.items():
        if name in keys or name in _NOT_RECORDED or unknown_keys({name: ""}):
            continue
        if getattr(config, name) != info.get_default(call_default_factory=True):
            keys.append(name)
    return [(key, _text(values[key])) for key in keys]


def _text(value: Any) -> str:
    """A setting as a property value TorchServe and tsctl both read back."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class SnapshotModel:
    name: str
    version: str
    mar_name: str
    default: bool
    settings: dict[str, Any]


def from_models_setting(models: dict[str, dict[str, dict[str, Any]]]) -> list[SnapshotModel]:
    """The `models` setting of config.properties has the snapshot's shape."""
    found = []
    for name, versions in models.items():
        for version, entry in versions.items():
            bookkeeping = ("defaultVersion", "marName", "runtimeType")
            settings = {k: v for k, v in entry.items() if k not in bookkeeping}
            mar = str(entry.get("marName") or f"{name}.mar")
            found.append(
                SnapshotModel(name, version, mar, bool(entry.get("defaultVersion")), settings)
            )
    return found


def models_of(registry: Registry) -> list[SnapshotModel]:
    """Every registered model version, as a snapshot records it."""
    return [
        SnapshotModel(
            mv.name, mv.version, mv.url, registry.default.get(mv.name) == mv.version, mv.settings()
        )
        for versions in registry.models.values()
        for mv in versions.values()
    ]


def load_options(entry: SnapshotModel) -> LoadOptions:
    """How to load a snapshot's model version: with the settings it had."""
    s = entry.settings
    return LoadOptions(
        name=entry.name,
        min_workers=s.get("minWorkers"),
        max_workers=s.get("maxWorkers"),
        batch_size=s.get("batchSize"),
        max_batch_delay=s.get("maxBatchDelay"),
        response_timeout=s.get("responseTimeout"),
        startup_timeout=s.get("startupTimeout"),
        startup=True,
        trusted=True,
    )


def directory(config: ServerConfig) -> Path:
    return config.log_dir / "config"


def write(config: ServerConfig, models: list[SnapshotModel], kind: str) -> Path | None:
    """Write a snapshot; a folder that cannot be written is logged, never fatal."""
    folder = directory(config)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S%f")[:-3]
    path = folder / f"{stamp}-{kind}.cfg"
    grouped: dict[str, dict[str, Any]] = {}
    for model in models:
        # runtimeType as TorchServe writes it (tsctl runs Python handlers only)
        entry = {
            "defaultVersion": model.default,
            "marName": model.mar_name,
            "runtimeType": "python",
            **model.settings,
        }
        grouped.setdefault(model.name, {})[model.version] = entry
    snapshot = {
        "name": path.name,
        "modelCount": len(models),
        "created": int(time.time() * 1000),
        "models": grouped,
    }
    lines = [f"# tsctl snapshot ({kind})", f"# {datetime.now().isoformat()}"]
    for key, text in recorded(config):
        lines.append(property_line(key, text))
    if config.model_store is not None:
        lines.append(property_line("model_store", str(config.model_store.resolve())))
    lines.append(property_line("model_snapshot", json.dumps(snapshot)))
    temporary = folder / f".{path.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
        _fsync_dir(folder)
    except OSError as exc:
        log.warning("cannot write a config snapshot in %s: %s", folder, exc.strerror)
        return None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def candidates(config: ServerConfig) -> list[Path]:
    """Snapshot files, newest first."""
    return _files(directory(config))


def _files(folder: Path) -> list[Path]:
    try:
        found = [p for p in folder.iterdir() if p.suffix == ".cfg" and not p.name.startswith(".")]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.name, reverse=True)


def parse(path: Path) -> list[SnapshotModel]:
    """The models of a snapshot file; `ValueError` with the reason if it is unusable."""
    return _models(read_properties(path))


def _models(properties: dict[str, str]) -> list[SnapshotModel]:
    raw = properties.get("model_snapshot")
    if raw is None:
        raise ValueError("it has no model_snapshot")
    try:
        doc = json.loads(raw)
        models = from_models_setting(doc["models"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"model_snapshot is malformed ({exc!r})") from None
    return models


def newest(config: ServerConfig) -> tuple[Path, list[SnapshotModel]] | None:
    """The newest snapshot that parses; each one skipped is logged with the reason."""
    for path in candidates(config):
        try:
            return path, parse(path)
        except (ValueError, OSError, TsctlError) as exc:
            log.error("skipping config snapshot %s: %s", path, exc)
    return None


@dataclass(frozen=True)
class StartupProperties:
    """The config.properties a start uses, where they come from (a path, or "" for none), and
    the snapshots skipped on the way (one line each, with the reason)."""

    properties: dict[str, str]
    source: str
    skipped: tuple[str, ...] = ()


def startup_properties(
    ts_config: Path | None, log_dir: Path, no_snapshots: bool
) -> StartupProperties:
    """TorchServe's choice of configuration: `--ts-config`'s file when given; else, unless
    `--ncs`, the newest snapshot in `<log_dir>/config` that parses (its properties, addresses
    and ports included); else none. The caller puts its flags on top. A snapshot's models are
    left out here: the daemon restores them from the same file (`newest`), naming it."""
    if ts_config is not None:
        return StartupProperties(read_properties(ts_config), str(ts_config))
    if no_snapshots:
        return StartupProperties({}, "")
    skipped = []
    for path in _files(log_dir / "config"):
        try:
            properties = read_properties(path)
            _models(properties)
        except (ValueError, TsctlError) as exc:
            skipped.append(f"{path}: {exc}")
            continue
        properties.pop("model_snapshot", None)
        return StartupProperties(properties, str(path), tuple(skipped))
    return StartupProperties({}, "", tuple(skipped))
