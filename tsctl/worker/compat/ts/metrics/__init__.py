"""`ts.metrics`: the names handlers use with `context.metrics` (`Dimension`, `MetricTypes`,
units, cache errors). The cache itself is tsctl's `tsctl.worker.metrics.MetricsCache`."""
