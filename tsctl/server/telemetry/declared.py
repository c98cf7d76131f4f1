"""Which metrics exist, of what kind, with which dimensions: TorchServe's `metrics_config`.

The file is TorchServe's metrics YAML: a `ts_metrics` section (the server's own metrics) and a
`model_metrics` section (those handlers emit), each with `counter`, `gauge` and `histogram`
lists of `{name, unit, dimensions}`. A server metric that is not declared is not recorded; a
handler's metric that is not declared is dropped unless `model_metrics_auto_detect` is on.
Without a file, `DEFAULT` declares what TorchServe's own default file declares. Read once, at
daemon start-up (a file that cannot be read or parsed stops the start with its name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsctl.errors import InvalidInput

KINDS = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    unit: str
    dimensions: tuple[str, ...]


@dataclass(frozen=True)
class Declarations:
    server: dict[str, MetricSpec]
    model: dict[str, MetricSpec]


def _specs(kind: str, unit: str, dims: tuple[str, ...], *names: str) -> list[MetricSpec]:
    return [MetricSpec(name, kind, unit, dims) for name in names]


_HOST = ("Level", "Hostname")
_GPU = ("Level", "DeviceId", "Hostname")
_MODEL_VERSION = ("model_name", "model_version", "hostname")
_MODEL = ("ModelName", "Level")

DEFAULT = Declarations(
    server={
        s.name: s
        for s in [
            *_specs("counter", "Count", _HOST, "Requests2XX", "Requests4XX", "Requests5XX"),
            *_specs("counter", "Count", _MODEL_VERSION, "ts_inference_requests_total"),
            *_specs(
                "counter",
                "Microseconds",
                _MODEL_VERSION,
                "ts_inference_latency_microseconds",
                "ts_queue_latency_microseconds",
            ),
            *_specs("gauge", "Milliseconds", _HOST, "QueueTime", "WorkerThreadTime"),
            *_specs("gauge", "Milliseconds", ("WorkerName", *_HOST), "WorkerLoadTime"),
            *_specs("gauge", "Percent", _HOST, "CPUUtilization", "MemoryUtilization"),
            *_specs("gauge", "Megabytes", _HOST, "MemoryUsed", "MemoryAvailable"),
            *_specs("gauge", "Gigabytes", _HOST, "DiskUsage", "DiskAvailable"),
            *_specs("gauge", "Percent", _HOST, "DiskUtilization"),
            *_specs("gauge", "Percent", _GPU, "GPUMemoryUtilization", "GPUUtilization"),
            *_specs("gauge", "Megabytes", _GPU, "GPUMemoryUsed"),
        ]
    },
    model={s.name: s for s in _specs("gauge", "ms", _MODEL, "HandlerTime", "PredictionTime")},
)


def load(path: Path | None) -> Declarations:
    """The declarations in the YAML file at `path`, or `DEFAULT` for none."""
    if path is None:
        return DEFAULT
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"cannot read metrics_config {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"metrics_config {path} is not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidInput(f"metrics_config {path}: expected a mapping at the top")
    return Declarations(
        server=_section(doc.get("ts_metrics"), path, "ts_metrics"),
        model=_section(doc.get("model_metrics"), path, "model_metrics"),
    )


def _section(section: Any, path: Path, where: str) -> dict[str, MetricSpec]:
    found: dict[str, MetricSpec] = {}
    if section is None:
        return found
    if not isinstance(section, dict):
        raise InvalidInput(f"metrics_config {path}: {where} must be a mapping of metric kinds")
    for kind, entries in section.items():
        if kind not in KINDS:
            raise InvalidInput(
                f"metrics_config {path}: {where}.{kind}: expected one of {', '.join(KINDS)}"
            )
        for entry in entries or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise InvalidInput(f"metrics_config {path}: {where}.{kind}: an entry has no name")
            dims = entry.get("dimensions") or []
            if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
                raise InvalidInput(
                    f"metrics_config {path}: {where}.{kind}.{entry['name']}: "
                    "dimensions must be a list of names"
                )
            name = entry["name"]
            found[name] = MetricSpec(name, kind, str(entry.get("unit", "")), tuple(dims))
    return found
