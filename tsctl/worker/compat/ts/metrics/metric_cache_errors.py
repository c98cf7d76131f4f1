"""`ts.metrics.metric_cache_errors`: the errors `context.metrics` raises.

`MetricsCacheKeyError` is the one tsctl's cache raises from `get_metric`; the others exist so
that handlers catching them import cleanly.
"""

from tsctl.worker.metrics import MetricsCacheKeyError

__all__ = [
    "GeneralMetricsCacheError",
    "MetricsCacheIOError",
    "MetricsCacheKeyError",
    "MetricsCachePyYamlError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
]


class GeneralMetricsCacheError(Exception):
    pass


class MetricsCacheTypeError(TypeError):
    pass


class MetricsCacheValueError(ValueError):
    pass


class MetricsCacheIOError(OSError):
    pass


class MetricsCachePyYamlError(Exception):
    pass
