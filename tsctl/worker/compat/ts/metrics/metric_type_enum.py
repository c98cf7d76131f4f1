"""`ts.metrics.metric_type_enum.MetricTypes`: counter, gauge or histogram.

tsctl exposes histograms as gauges (the value of the last observation).
"""

import enum


class MetricTypes(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
