"""`context.metrics`: the handler's own metrics, with TorchServe's method names.

Values are collected during a batch and travel back with its result; the frontend exposes
them on the metrics API and writes them to model_metrics.log. Dimensions may be given as a
dict, or as TorchServe's `Dimension` objects (anything with `name` and `value`).
"""

from __future__ import annotations

from typing import Any

from tsctl.protocol import CustomMetric


def _dimensions(dimensions: Any, model_name: str) -> dict[str, str]:
    found: dict[str, str] = {"ModelName": model_name, "Level": "Model"}
    if isinstance(dimensions, dict):
        found.update({str(k): str(v) for k, v in dimensions.items()})
    elif dimensions:
        for dimension in dimensions:
            found[str(dimension.name)] = str(dimension.value)
    return found


class MetricsCache:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.collected: list[CustomMetric] = []

    def take(self) -> list[CustomMetric]:
        taken, self.collected = self.collected, []
        return taken

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str = "count",
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = "counter",
    ) -> None:
        kind = str(getattr(metric_type, "value", metric_type)).lower()
        kind = "counter" if kind == "counter" else "gauge"
        dims = _dimensions(dimensions, self.model_name)
        self.collected.append(CustomMetric(name, unit, kind, float(value), dims))

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = None) -> None:
        self.add_metric(name, value, "count", idx, dimensions, "counter")

    def add_time(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "ms",
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        self.add_metric(name, value, unit, idx, dimensions, metric_type)

    def add_size(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "MB",
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        self.add_metric(name, value, unit, idx, dimensions, metric_type)

    def add_percent(
        self,
        name: str,
        value: float,
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        self.add_metric(name, value, "percent", idx, dimensions, metric_type)

    def add_error(self, name: str, value: float, dimensions: Any = None) -> None:
        self.add_metric(name, value, "count", None, dimensions, "counter")
