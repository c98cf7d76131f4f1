"""Metrics (the Prometheus registry, the metric log files) and the daemon's logs."""
