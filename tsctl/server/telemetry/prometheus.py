"""In-memory metrics and their Prometheus text exposition. Event-loop only, never blocks.

Families keep TorchServe's names and labels (`ts_inference_requests_total`,
`ts_inference_latency_microseconds`, `ts_queue_latency_microseconds`, `Requests2XX`,
`QueueTime`, `HandlerTime`, ...), so dashboards built on TorchServe keep working, plus the
ones operators asked for: `tsctl_batch_size` (histogram), `tsctl_queue_depth`,
`tsctl_worker_restarts_total`. Handlers' own metrics (`context.metrics`) arrive with each
batch result and land here too. Updating a value is a dict lookup and an addition.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

HOSTNAME = socket.gethostname()
_NAME_OK = re.compile(r"[^a-zA-Z0-9_:]")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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

    def inc(self, labels: Sequence[str], amount: float = 1.0) -> None:
        key = tuple(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, labels: Sequence[str], value: float) -> None:
        self.values[tuple(labels)] = value

    def observe(self, labels: Sequence[str], value: float) -> None:
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
        pairs = [f'{n}="{_escape(v)}"' for n, v in zip(self.labels, key, strict=True)]
        if extra:
            pairs.append(f'{extra[0]}="{extra[1]}"')
        return "{" + ",".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


class Metrics:
    """Every family the daemon exposes, created on first use."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        model = ("model_name", "model_version", "hostname")
        self.requests_total = self.family(
            "ts_inference_requests_total", "counter", "Inference requests answered", model
        )
        self.latency = self.family(
            "ts_inference_latency_microseconds",
            "counter",
            "Total time spent answering inference requests, in microseconds",
            model,
        )
        self.queue_latency = self.family(
            "ts_queue_latency_microseconds",
            "counter",
            "Total time inference requests spent queued, in microseconds",
            model,
        )
        host = ("Level", "Hostname")
        self.by_status = {
            f"{c}XX": self.family(f"Requests{c}XX", "counter", f"Responses with status {c}xx", host)
            for c in (2, 4, 5)
        }
        self.queue_time = self.family("QueueTime", "gauge", "Last queue time (ms)", host)
        self.worker_thread_time = self.family(
            "WorkerThreadTime",
            "gauge",
            "Last frontend-side batch time beyond the handler (ms)",
            host,
        )
        self.worker_load_time = self.family(
            "WorkerLoadTime", "gauge", "Last worker start-up time (ms)", ("WorkerName", *host)
        )
        backend = ("ModelName", "Level", "Hostname")
        self.handler_time = self.family("HandlerTime", "gauge", "Last handler time (ms)", backend)
        self.prediction_time = self.family(
            "PredictionTime", "gauge", "Last prediction time of a batch (ms)", backend
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
            "Requests waiting in a model's queue",
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

    def count_status(self, status: int) -> None:
        family = self.by_status.get(f"{status // 100}XX")
        if family is not None:
            family.inc(("Host", HOSTNAME))

    def custom(self, name: str, unit: str, kind: str, value: float, dims: dict[str, str]) -> None:
        """A metric a handler emitted through `context.metrics`."""
        safe = _NAME_OK.sub("_", name) or "custom"
        labels = (*sorted(dims), "Hostname")
        family = self.family(
            safe, "counter" if kind == "counter" else "gauge", f"{name} ({unit})", labels
        )
        if family.labels != labels:  # same name, other dimensions: keep them apart
            family = self.family(f"{safe}_{len(labels)}", family.kind, family.help, labels)
        key = (*(dims[k] for k in sorted(dims)), HOSTNAME)
        if family.kind == "counter":
            family.inc(key, value)
        else:
            family.set(key, value)

    def render(self, names: set[str] | None = None) -> str:
        lines: list[str] = []
        for family in self.families.values():
            if names and family.name not in names:
                continue
            if family.values or family.histograms:
                lines.extend(family.render())
        return "\n".join(lines) + "\n" if lines else ""
