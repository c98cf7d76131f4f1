"""The daemon's metrics: in memory for the metrics API, and as lines in the metrics logs.

Families keep TorchServe's names and labels (`ts_inference_requests_total`,
`ts_inference_latency_microseconds`, `ts_queue_latency_microseconds`, `Requests2XX`,
`QueueTime`, `HandlerTime`, ...), so dashboards built on TorchServe keep working, plus the
ones operators asked for: `tsctl_batch_size` (histogram), `tsctl_queue_depth`,
`tsctl_worker_restarts_total`. Handlers' own metrics (`context.metrics`) arrive with each
batch result (`model_metric`).

Which TorchServe metric goes where follows `metrics_mode` and the metrics configuration
(`declared.py`): in `log` mode each update is also a line in ts_metrics.log (server metrics)
or model_metrics.log (handlers' metrics), in TorchServe's
`Name.Unit:value|#dims|#hostname:host[,requestID:id],timestamp:s` form; in `prometheus` mode
they are only on the metrics API; in `legacy` mode the three `ts_*` families are only on the
metrics API and every other metric only in the logs. tsctl's own `tsctl_*` families are always
on the metrics API. Event-loop only, never blocks. Per request the cost is small: each label
set is a `Series` bound once (a model version's are held by `Metrics.for_model`), so an
update is an addition and, when logged, one string built around the value from cached text
and appended to a buffer that `logs.LineLog` writes once per event-loop turn.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tsctl.server.telemetry.declared import DEFAULT, Declarations, MetricSpec

HOSTNAME = socket.gethostname()
_NAME_OK = re.compile(r"[^a-zA-Z0-9_:]")
#: request durations, in seconds: 1 ms to 60 s
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: the Prometheus client's default buckets (TorchServe's histograms use them)
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: what `legacy` mode keeps on the metrics API (and out of the logs)
LEGACY_PROMETHEUS = frozenset(
    (
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    )
)
MODES = ("log", "prometheus", "legacy")

log = logging.getLogger("tsctl.server")


class LineSink(Protocol):
    def write(self, text: str) -> None: ...

    def write_metric(self, head: str, value: float, tail: str) -> None:
        """`head`, `repr(value)`, `tail`, then the line's epoch second (`logs.LineLog`)."""


def ts_micros(seconds: float) -> float:
    """`seconds` in µs as TorchServe writes them (whole ns / 1000.0): at most three decimals,
    where `seconds * 1e6` has up to 17 significant digits, which are also slower to write."""
    return int(seconds * 1e9) / 1000


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Series:
    """One label set of a family, bound once: an update is no label handling, and its
    metric line is cached text around the value (TorchServe's
    `Name.Unit:value|#dims|#hostname:host[,requestID:id],timestamp:s`; the last label is the
    hostname). A family's routing (`sink`, `exposed`, `unit`, `log_dims`) is set before its
    first update (`Metrics._route`), so the cached text stays right."""

    __slots__ = ("family", "head", "key", "record", "stamped", "tail")

    def __init__(self, family: Family, key: tuple[str, ...]) -> None:
        self.family = family
        self.key = key
        dims = ",".join(f"{n}:{v}" for n, v in zip(family.log_dims, key[:-1], strict=False))
        self.head = f"{family.name}.{family.unit}:"
        self.tail = f"|#{dims}|#hostname:{key[-1] if key else ''}"
        self.stamped = f"{self.tail},timestamp:"
        #: the update a value of this family's kind gets (a handler metric's)
        self.record = (
            self.inc
            if family.kind == "counter"
            else self.observe
            if family.kind == "histogram"
            else self.set
        )

    def inc(self, amount: float = 1.0, request_id: str = "") -> None:
        family = self.family
        if family.sink is not None:
            if request_id:
                family.sink.write_metric(self.head, float(amount), self.with_id(request_id))
            else:
                family.sink.write_metric(self.head, float(amount), self.stamped)
        if family.exposed:
            values = family.values
            values[self.key] = values.get(self.key, 0.0) + amount

    def set(self, value: float, request_id: str = "") -> None:
        family = self.family
        if family.sink is not None:
            if request_id:
                family.sink.write_metric(self.head, float(value), self.with_id(request_id))
            else:
                family.sink.write_metric(self.head, float(value), self.stamped)
        if family.exposed:
            family.values[self.key] = value

    def observe(self, value: float, request_id: str = "") -> None:
        family = self.family
        if family.sink is not None:
            if request_id:
                family.sink.write_metric(self.head, float(value), self.with_id(request_id))
            else:
                family.sink.write_metric(self.head, float(value), self.stamped)
        if not family.exposed:
            return
        counts = family.histograms.get(self.key)
        if counts is None:  # one count per bucket (not cumulated), then sum, then count
            counts = family.histograms[self.key] = [0.0] * (len(family.buckets) + 2)
        buckets = family.buckets
        i = bisect_left(buckets, value)  # the first bucket the value is in (`le`)
        if i < len(buckets) and value <= buckets[i]:
            counts[i] += 1
        counts[-2] += value
        counts[-1] += 1

    def with_id(self, request_id: str) -> str:
        return f"{self.tail},requestID:{request_id},timestamp:"

    def write_line(self, value: float, request_id: str = "") -> None:
        sink = self.family.sink
        assert sink is not None
        tail = self.with_id(request_id) if request_id else self.stamped
        sink.write_metric(self.head, float(value), tail)


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)
    histograms: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    #: kept for the metrics API (else only logged, or not recorded at all)
    exposed: bool = True
    #: where each update is also written as a line (ts_metrics.log or model_metrics.log)
    sink: LineSink | None = None
    unit: str = ""
    #: the dimension names a log line shows (the labels less the last one, the hostname)
    log_dims: tuple[str, ...] = ()
    #: each label set's `Series`, bound at its first update
    children: dict[tuple[str, ...], Series] = field(default_factory=dict, repr=False)

    def series(self, labels: Sequence[str]) -> Series:
        """The label set's series: bind it once (per model version, ...) and update it."""
        key = labels if type(labels) is tuple else tuple(labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = Series(self, key)
        return found

    def inc(self, labels: Sequence[str], amount: float = 1.0, request_id: str = "") -> None:
        self.series(labels).inc(amount, request_id)

    def set(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        self.series(labels).set(value, request_id)

    def observe(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        self.series(labels).observe(value, request_id)

    def write_line(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        """TorchServe's metric line; the last label is the hostname."""
        self.series(labels).write_line(value, request_id)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        if self.kind == "histogram":
            for key, counts in self.histograms.items():
                base = self._labels(key)
                cumulated = 0.0
                for bound, count in zip(self.buckets, counts, strict=False):
                    cumulated += count
                    le = self._labels(key, ("le", _num(bound)))
                    yield f"{self.name}_bucket{le} {_num(cumulated)}"
                yield f"{self.name}_bucket{self._labels(key, ('le', '+Inf'))} {_num(counts[-1])}"
                yield f"{self.name}_sum{base} {_num(counts[-2])}"
                yield f"{self.name}_count{base} {_num(counts[-1])}"
            return
        for key, value in self.values.items():
            yield f"{self.name}{self._labels(key)} {_num(value)}"

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """The current (labels, value) pairs of the series `name`: the family's own, or for a
        histogram its `_bucket` (with `le`, cumulative), `_sum` or `_count` series."""
        if self.kind != "histogram":
            return [(dict(zip(self.labels, k, strict=True)), v) for k, v in self.values.items()]
        found: list[tuple[dict[str, str], float]] = []
        for key, counts in self.histograms.items():
            labels = dict(zip(self.labels, key, strict=True))
            if name == f"{self.name}_sum":
                found.append((labels, counts[-2]))
            elif name == f"{self.name}_count":
                found.append((labels, counts[-1]))
            elif name == f"{self.name}_bucket":
                cumulated = 0.0
                for bound, count in zip(self.buckets, counts, strict=False):
                    cumulated += count
                    found.append(({**labels, "le": _num(bound)}, cumulated))
                found.append(({**labels, "le": "+Inf"}, counts[-1]))
        return found

    def _labels(self, key: tuple[str, ...], extra: tuple[str, str] | None = None) -> str:
        # TorchServe's (the Java client's) form: a comma after each pair; parsers accept it
        pairs = [f'{n}="{_escape(v)}",' for n, v in zip(self.labels, key, strict=True)]
        if extra:
            pairs.append(f'{extra[0]}="{extra[1]}",')
        return "{" + "".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isnan(value):  # a handler's histogram fed NaN: Prometheus' own spelling
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


class Metrics:
    """Every family the daemon records, routed by `mode` and the declarations."""

    def __init__(
        self,
        mode: str = "log",
        declared: Declarations = DEFAULT,
        auto_detect: bool = False,
        server_log: LineSink | None = None,
        model_log: LineSink | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"metrics_mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.declared = declared
        self.auto_detect = auto_detect
        self.server_log = server_log
        self.model_log = model_log
        self.families: dict[str, Family] = {}
        self._models: dict[tuple[str, str], ModelSeries] = {}
        self._by_status: dict[int, Series] = {}
        #: handlers' metrics found undeclared (auto-detected, or warned about once)
        self.detected: dict[str, MetricSpec | None] = {}
        model = ("model_name", "model_version", "hostname")
        self.requests_total = self.server_family(
            "ts_inference_requests_total", "counter", "Inference requests answered", model
        )
        self.latency = self.server_family(
            "ts_inference_latency_microseconds",
            "counter",
            "Total time spent answering inference requests, in microseconds",
            model,
        )
        self.queue_latency = self.server_family(
            "ts_queue_latency_microseconds",
            "counter",
            "Total time inference requests spent queued, in microseconds",
            model,
        )
        host = ("Level", "Hostname")
        self.by_status = {
            f"{c}XX": self.server_family(
                f"Requests{c}XX", "counter", f"Responses with status {c}xx", host
            )
            for c in (2, 4, 5)
        }
        self.queue_time = self.server_family("QueueTime", "gauge", "Last queue time (ms)", host)
        self.worker_thread_time = self.server_family(
            "WorkerThreadTime",
            "gauge",
            "Last frontend-side batch time beyond the handler (ms)",
            host,
        )
        self.worker_load_time = self.server_family(
            "WorkerLoadTime", "gauge", "Last worker start-up time (ms)", ("WorkerName", *host)
        )
        self.batch_size = self.family(
            "tsctl_batch_size",
            "histogram",
            "Requests per batch sent to a worker",
            ("model_name", "model_version"),
            BATCH_BUCKETS,
        )
        self.request_duration = self.family(
            "tsctl_request_duration_seconds",
            "histogram",
            "Time from a prediction's arrival to its answer (REST), in seconds",
            ("model_name", "model_version"),
            DURATION_BUCKETS,
        )
        self.queue_depth = self.family(
            "tsctl_queue_depth",
            "gauge",
            "Requests waiting in a model version's queue for a worker, when scraped",
            ("model_name", "model_version"),
        )
        self.restarts = self.family(
            "tsctl_worker_restarts_total",
            "counter",
            "Workers that died and were restarted",
            ("model_name", "model_version"),
        )

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...] = (),
    ) -> Family:
        found = self.families.get(name)
        if found is None:
            found = self.families[name] = Family(name, kind, help_text, labels, buckets)
        return found

    def _route(self, family: Family, spec: MetricSpec, sink: LineSink | None) -> Family:
        """Where a TorchServe metric goes in this mode: the metrics API, a log, or both."""
        legacy = family.name in LEGACY_PROMETHEUS
        family.exposed = self.mode != "legacy" or legacy
        logged = self.mode == "log" or (self.mode == "legacy" and not legacy)
        family.sink = sink if logged else None
        family.unit = spec.unit
        family.log_dims = family.labels[:-1]
        return family

    def server_family(
        self, name: str, kind: str, help_text: str, labels: tuple[str, ...]
    ) -> Family:
        """One of the server's TorchServe metrics: recorded only when declared. Declared
        dimension names replace tsctl's when there are as many."""
        spec = self.declared.server.get(name)
        if spec is None:
            family = Family(name, kind, help_text, labels, exposed=False)
            self.families.setdefault(name, family)
            return family
        if len(spec.dimensions) == len(labels):
            labels = spec.dimensions
        return self._route(self.family(name, kind, help_text, labels), spec, self.server_log)

    def count_status(self, status: int) -> None:
        status_class = status // 100
        found = self._by_status.get(status_class)
        if found is None:
            family = self.by_status.get(f"{status_class}XX")
            if family is None:
                return
            found = self._by_status[status_class] = family.series(("Host", HOSTNAME))
        found.inc()

    def for_model(self, name: str, version: str) -> ModelSeries:
        """A model version's series of the per-request and per-batch families, bound once."""
        found = self._models.get((name, version))
        if found is None:
            found = self._models[(name, version)] = ModelSeries(self, name, version)
        return found

    def model_metric(
        self,
        name: str,
        unit: str,
        kind: str,
        value: float,
        dims: Mapping[str, str],
        request_id: str = "",
    ) -> None:
        """A handler's metric (or the handler time the frontend measured): recorded when the
        metrics configuration declares it, or with `model_metrics_auto_detect`."""
        found = self.model_series(name, unit, kind, dims)
        if found is not None:
            found.record(value, request_id)

    def model_series(
        self, name: str, unit: str, kind: str, dims: Mapping[str, str]
    ) -> Series | None:
        """The series a handler metric with these dimensions updates (`Series.record`);
        None when it is not recorded (see `model_metric`)."""
        family = self.families.get(f"model:{name}")
        if family is None:
            family = self._model_family(name, unit, kind, dims)
            if family is None:
                return None
        return family.series((*(str(dims.get(d, "")) for d in family.labels[:-1]), HOSTNAME))

    def _model_family(
        self, name: str, unit: str, kind: str, dims: Mapping[str, str]
    ) -> Family | None:
        spec = self.declared.model.get(name)
        if spec is None:
            if name in self.detected:
                return None
            if not self.auto_detect:
                self.detected[name] = None
                log.warning(
                    "handler metric %s is not declared in the metrics configuration: dropped "
                    "(declare it in metrics_config, or set model_metrics_auto_detect=true)",
                    name,
                )
                return None
            # TorchServe's order: the handler's own dimensions, then ModelName and Level
            own = [d for d in dims if d not in ("ModelName", "Level")]
            spec = MetricSpec(name, kind, unit, (*own, *(d for d in _MODEL_DIMS if d in dims)))
            self.detected[name] = spec
            log.info("auto-detected handler metric %s (%s, %s)", name, kind, spec.dimensions)
        safe = _NAME_OK.sub("_", name) or "custom"
        buckets = DEFAULT_BUCKETS if spec.kind == "histogram" else ()
        family = Family(
            safe, spec.kind, f"{name} ({spec.unit})", (*spec.dimensions, "Hostname"), buckets
        )
        self._route(family, spec, self.model_log)
        if safe in self.families:  # a server family has that name: only logged, if at all
            family.exposed = False
        else:
            self.families[safe] = family
        self.families[f"model:{name}"] = family
        return family

    def model_declarations(self) -> tuple[tuple[str, str, tuple[str, ...], str], ...]:
        """The declared model metrics, for the workers' `context.metrics`."""
        return tuple((s.name, s.unit, s.dimensions, s.kind) for s in self.declared.model.values())

    def settle_logs(self) -> None:
        """Write the metric lines buffered for the end of this turn now (`LineLog.settle`):
        the pool calls it before it sends a batch's answers."""
        for sink in (self.server_log, self.model_log):
            settle = getattr(sink, "settle", None)
            if settle is not None:
                settle()

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """A metric's current samples by its metrics-API name (see `Family.samples`)."""
        family = self.families.get(name)
        if family is None:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix):
                    family = self.families.get(name.removesuffix(suffix))
                    break
        return family.samples(name) if family is not None else []

    def render(self, names: set[str] | None = None) -> str:
        lines: list[str] = []
        seen: set[int] = set()
        for family in self.families.values():
            if id(family) in seen or not family.exposed:
                continue
            seen.add(id(family))
            if names and family.name not in names:
                continue
            # a declared family is listed before its first sample, as TorchServe's client does
            if family.values or family.histograms or family.sink is not None or family.unit:
                lines.extend(family.render())
        return "\n".join(lines) + "\n" if lines else ""


_MODEL_DIMS = ("ModelName", "Level")


class ModelSeries:
    """The series one model version updates per request and per batch, bound at its first
    request (`Metrics.for_model`): the pool and the exchanges update them without label
    handling."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self.metrics = metrics
        self.name = name
        model = (name, version, HOSTNAME)
        host = ("Host", HOSTNAME)
        self.requests_total = metrics.requests_total.series(model)
        self.latency = metrics.latency.series(model)
        self.queue_latency = metrics.queue_latency.series(model)
        self.queue_time = metrics.queue_time.series(host)
        self.worker_thread_time = metrics.worker_thread_time.series(host)
        self.batch_size = metrics.batch_size.series((name, version))
        self.duration = metrics.request_duration.series((name, version))
        self._handler_time: tuple[Series, ...] | None = None

    def answered(self, seconds: float) -> None:
        """A prediction answered `seconds` after it arrived: counted, its time summed (the
        TorchServe counters) and observed (`tsctl_request_duration_seconds`)."""
        self.requests_total.inc()
        self.latency.inc(ts_micros(seconds))
        self.duration.observe(seconds)

    def handler_time(self) -> tuple[Series, ...]:
        """`HandlerTime` and `PredictionTime` (TorchServe's backend metrics), those the
        metrics configuration declares; resolved at the first batch's result, when an
        undeclared one is warned about (`Metrics.model_metric`)."""
        found = self._handler_time
        if found is None:
            backend = {"ModelName": self.name, "Level": "Model"}
            bound = (
                self.metrics.model_series(name, "ms", "gauge", backend)
                for name in ("HandlerTime", "PredictionTime")
            )
            found = self._handler_time = tuple(s for s in bound if s is not None)
        return found
