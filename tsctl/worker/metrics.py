"""`context.metrics`: the handler's own metrics, with TorchServe's method names.

Values are collected during a batch and travel back with its result; the frontend exposes
them on the metrics API and writes them to model_metrics.log. Dimensions may be given as a
dict, or as TorchServe's `Dimension` objects (anything with `name` and `value`).

TorchServe's metric objects work too: `add_metric_to_cache(name, unit, dimension_names,
metric_type)` defines a metric and `get_metric(name, metric_type)` finds one (also one an
`add_*` call made); its `add_or_update(value, dimension_values)` records a value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from tsctl.ipc.messages import CustomMetric

log = logging.getLogger("tsctl.worker")


def _dimensions(dimensions: Any, model_name: str) -> dict[str, str]:
    found: dict[str, str] = {"ModelName": model_name, "Level": "Model"}
    if isinstance(dimensions, dict):
        found.update({str(k): str(v) for k, v in dimensions.items()})
    elif dimensions:
        for dimension in dimensions:
            found[str(dimension.name)] = str(dimension.value)
    return found


def _kind(metric_type: Any) -> str:
    """`counter`, `gauge` or `histogram` from a TorchServe `MetricTypes` member or its name."""
    kind = str(getattr(metric_type, "value", metric_type)).lower()
    return kind if kind in ("counter", "histogram") else "gauge"


class MetricsCacheKeyError(KeyError):
    """`get_metric` was asked for a metric this worker has not defined (TorchServe's
    `ts.metrics.metric_cache_errors.MetricsCacheKeyError` is this class)."""


class CachedMetric:
    """A metric with fixed dimension names, as TorchServe's `get_metric` returns."""

    def __init__(
        self,
        cache: MetricsCache,
        name: str,
        unit: str,
        dimension_names: Sequence[str],
        metric_type: Any,
    ) -> None:
        self.cache = cache
        self.metric_name = name
        self.unit = unit
        self.dimension_names = list(dimension_names)
        self.metric_type = metric_type
        #: defined by an `add_*` call: its values also get ModelName and Level, as there
        self.implicit = False

    def add_or_update(
        self, value: float, dimension_values: Sequence[Any] = (), request_id: str = ""
    ) -> None:
        """Record `value` with one value per dimension name (a mismatch is logged, as in
        TorchServe, and the value dropped)."""
        values = list(dimension_values or ())
        if len(values) != len(self.dimension_names):
            log.error(
                "metric %s: dimension values %s do not match its dimension names %s",
                self.metric_name, values, self.dimension_names,
            )  # fmt: skip
            return
        if _kind(self.metric_type) == "counter" and value < 0:
            log.error("metric %s: a counter cannot go down (value %s)", self.metric_name, value)
            return
        dims = dict(zip(self.dimension_names, values, strict=True))
        self.cache.add_metric(
            self.metric_name,
            value,
            self.unit,
            None,
            dims,
            self.metric_type,
            define=False,
            defaults=self.implicit,
        )

    def update(self, value: float, request_id: str = "", dimensions: Sequence[Any] = ()) -> None:
        """TorchServe's older form: dimensions as `Dimension` objects, replacing the names."""
        self.dimension_names = [str(d.name) for d in dimensions]
        self.add_or_update(value, [d.value for d in dimensions], request_id)


class MetricsCache:
    def __init__(self, model_name: str, declared: Sequence[Sequence[Any]] = ()) -> None:
        self.model_name = model_name
        #: the values recorded and not yet taken, per context: an `asyncCommunication`
        #: worker runs each batch as a task of its own (`isolate`), so concurrent batches
        #: never take each other's
        self._collected: ContextVar[list[CustomMetric]] = ContextVar(f"metrics-{id(self)}")
        self._collected.set([])
        self._defined: dict[tuple[str, str], CachedMetric] = {}
        # the metrics configuration's model metrics, as TorchServe's worker loads them:
        # `get_metric` finds them without the handler defining them
        for name, unit, dimension_names, kind in declared:
            self.add_metric_to_cache(name, unit, dimension_names, kind)
        #: set by TorchServe's worker per batch; kept for handlers that read it
        self.request_ids: Any = None

    def set_request_ids(self, request_ids: Any) -> None:
        self.request_ids = request_ids

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: Sequence[str] = (),
        metric_type: Any = "counter",
    ) -> CachedMetric:
        """Define (or redefine) a metric; returns it for `add_or_update`."""
        metric = CachedMetric(self, metric_name, unit, dimension_names, metric_type)
        self._defined[(metric_name, _kind(metric_type))] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: Any = "counter") -> CachedMetric:
        """The metric of that name and type; `MetricsCacheKeyError` if it was never defined."""
        try:
            return self._defined[(metric_name, _kind(metric_type))]
        except KeyError:
            raise MetricsCacheKeyError(
                f"metric {metric_name!r} of type {_kind(metric_type)} is not defined: create it "
                "with add_metric_to_cache() or one of the add_* methods first"
            ) from None

    @property
    def collected(self) -> list[CustomMetric]:
        """The values recorded in this context and not yet taken."""
        try:
            return self._collected.get()
        except LookupError:  # a thread's context the cache was not made in
            fresh: list[CustomMetric] = []
            self._collected.set(fresh)
            return fresh

    def take(self) -> list[CustomMetric]:
        taken = self.collected
        self._collected.set([])
        return taken

    def isolate(self) -> None:
        """From now on, in the current context (a batch's task), values are collected apart
        from every other context's."""
        self._collected.set([])

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str = "count",
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = "counter",
        *,
        define: bool = True,
        defaults: bool = True,
    ) -> None:
        """Record a value; `defaults`: add the ModelName and Level dimensions (a metric
        defined with `add_metric_to_cache` gets exactly its named dimensions)."""
        kind = _kind(metric_type)
        if defaults:
            dims = _dimensions(dimensions, self.model_name)
        else:
            dims = {str(k): str(v) for k, v in dict(dimensions or {}).items()}
        if define and (name, kind) not in self._defined:
            names = [k for k in dims if k not in ("ModelName", "Level")]
            self.add_metric_to_cache(name, unit, names, metric_type).implicit = True
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
