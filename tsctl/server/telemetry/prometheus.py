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
on the metrics API. Event-loop only, never blocks: updating a value is a dict lookup and an
addition, and a log line is one buffered write (`logs.LineLog`).
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tsctl.server.telemetry.declared import DEFAULT, Declarations, MetricSpec

HOSTNAME = socket.gethostname()
_NAME_OK = re.compile(r"[^a-zA-Z0-9_:]")
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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

    def inc(self, labels: Sequence[str], amount: float = 1.0, request_id: str = "") -> None:
        if self.sink is not None:
            self.write_line(labels, amount, request_id)
        if self.exposed:
            key = tuple(labels)
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        if self.sink is not None:
            self.write_line(labels, value, request_id)
        if self.exposed:
            self.values[tuple(labels)] = value

    def write_line(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        """TorchServe's metric line; the last label is the hostname."""
        assert self.sink is not None
        dims = ",".join(f"{n}:{v}" for n, v in zip(self.log_dims, labels[:-1], strict=False))
        rid = f",requestID:{request_id}" if request_id else ""
        self.sink.write(
            f"{self.name}.{self.unit}:{float(value)!r}|#{dims}|#hostname:{labels[-1]}{rid},"
            f"timestamp:{int(time.time())}"
        )

    def observe(self, labels: Sequence[str], value: float, request_id: str = "") -> None:
        if self.sink is not None:
            self.write_line(labels, value, request_id)
        if not self.exposed:
            return
        key = tuple(labels)
        counts = self.histograms.get(key)
        if counts is None:  # one count per bucket, then sum, then count
            counts = self.histograms[key] = [0.0] * (len(self.buckets) + 2)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-2] += value
        counts[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        if self.kind == "histogram":
            for key, counts in self.histograms.items():
                base = self._labels(key)
                for bound, count in zip(self.buckets, counts, strict=False):
                    le = self._labels(key, ("le", _num(bound)))
                    yield f"{self.name}_bucket{le} {_num(count)}"
                yield f"{self.name}_bucket{self._labels(key, ('le', '+Inf'))} {_num(counts[-1])}"
                yield f"{self.name}_sum{base} {_num(counts[-2])}"
                yield f"{self.name}_count{base} {_num(counts[-1])}"
            return
        for key, value in self.values.items():
            yield f"{self.name}{self._labels(key)} {_num(value)}"

    def _labels(self, key: tuple[str, ...], extra: tuple[str, str] | None = None) -> str:
        # TorchServe's (the Java client's) form: a comma after each pair; parsers accept it
        pairs = [f'{n}="{_escape(v)}",' for n, v in zip(self.labels, key, strict=True)]
        if extra:
            pairs.append(f'{extra[0]}="{extra[1]}",')
        return "{" + "".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
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
        family = self.by_status.get(f"{status // 100}XX")
        if family is not None:
            family.inc(("Host", HOSTNAME))

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
        family = self.families.get(f"model:{name}")
        if family is None:
            family = self._model_family(name, unit, kind, dims)
            if family is None:
                return
        key = (*(str(dims.get(d, "")) for d in family.labels[:-1]), HOSTNAME)
        if family.kind == "counter":
            family.inc(key, value, request_id)
        elif family.kind == "histogram":
            family.observe(key, value, request_id)
        else:
            family.set(key, value, request_id)

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
