"""`ts.metrics.metric_cache_abstract.MetricCacheAbstract`: the type of `context.metrics`.

In tsctl that is `tsctl.worker.metrics.MetricsCache`, so `isinstance` checks against this name
hold for the cache a worker gives handlers.
"""

from tsctl.worker.metrics import CachedMetric, MetricsCache

MetricCacheAbstract = MetricsCache
#: the metric objects `get_metric` and `add_metric_to_cache` return
MetricAbstract = CachedMetric

__all__ = ["MetricAbstract", "MetricCacheAbstract"]
