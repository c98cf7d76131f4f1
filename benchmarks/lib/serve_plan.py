"""serve_bench's plan (what to run), the results its sections fill in, and the order in which
the servers take their turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.lib.load import Load

SECTIONS = ("a", "b", "c", "d")
#: the plain-Python row of section (c)
FLOOR_NAME = "floor"


@dataclass
class Plan:
    workers: list[int]
    batches: list[int]
    concs: list[int]
    duration: float
    warmup: float
    resnet_duration: float
    startup_trials: int
    repeat: int
    retries: int
    sections: set[str]
    servers: list[str]


@dataclass
class MlpRow:
    server: str
    workers: int
    batch: int
    conc: int
    threads: list[int]
    load: Load
    rep: int = 0
    #: CPU µs per answered request: the server's frontend process (tsctl's daemon,
    #: TorchServe's JVM) and its workers
    fe_us: float = 0.0
    wk_us: float = 0.0
    #: the mean batch the workers got (tsctl's `tsctl_batch_size`; 0 when unknown)
    mean_batch: float = 0.0


@dataclass
class ResnetResult:
    loop_items_s: list[float] = field(default_factory=list)
    loop_threads: int = 0
    loop_base: dict[str, float] = field(default_factory=dict)  # mean of the loops around it
    loop_other_cores: list[float] = field(default_factory=list)
    served: dict[str, Load] = field(default_factory=dict)
    threads: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class StartupResult:
    server: str
    first_200_s: list[float] = field(default_factory=list)
    launcher_s: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class RssResult:
    server: str
    idle_bytes: int = 0
    peak_bytes: int = 0
    processes: int = 0
    samples: int = 0


@dataclass
class Results:
    mlp: list[MlpRow] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=dict)
    resnet: ResnetResult | None = None
    startup: list[StartupResult] = field(default_factory=list)
    rss: list[RssResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
