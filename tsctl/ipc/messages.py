"""The typed messages frontend and worker exchange, and the values both sides agree on.

Plain frozen dataclasses and enums, no I/O (those made once or more per request are
`value_class`es: frozen to the type checker, cheap to build): `tsctl.ipc.codec` turns them
into frames and back. The frontend builds a `WorkerSpec` once per model version (its
defaults live here and nowhere else) and each worker receives it in its first frame,
`Assign`. A worker reports what went wrong as a `Failure`: a `FailureKind` and a message for
the client; the frontend alone decides which HTTP or gRPC status a kind is answered with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, TypeVar, dataclass_transform

_C = TypeVar("_C")


@dataclass_transform(frozen_default=True)
def value_class(cls: type[_C]) -> type[_C]:
    """A dataclass that is immutable to the type checker (mypy refuses an assignment to a
    field, as for `frozen=True`) and hashable by value, with `__slots__`, but not frozen at
    run time: a frozen dataclass sets each field through `object.__setattr__`, three times
    the cost of building one, and these are built several times per request on the
    daemon's event loop."""
    return dataclass(unsafe_hash=True, slots=True)(cls)


class Kind(IntEnum):
    """A frame's type byte."""

    HELLO = 1  # worker → frontend: initialized, ready for batches
    INIT_FAILED = 2  # worker → frontend: loading the handler failed
    BATCH = 3  # frontend → worker: requests to run together
    RESULT = 4  # worker → frontend: one response per request of a batch
    STOP = 5  # frontend → worker: finish and exit
    DESCRIBE = 6  # frontend → worker: call the handler's describe_handle
    DESCRIBED = 7  # worker → frontend: its answer
    CHUNK = 8  # worker → frontend: intermediate answers of a streaming handler
    ASSIGN = 9  # frontend → worker, first: the model to load and its settings
    PLAIN_RESULT = 10  # worker → frontend: a RESULT of plain answers, its meta binary


class FailureKind(str, Enum):
    """What went wrong in a worker. The values travel in frames (they are TorchServe-ish names
    that also read well in logs)."""

    HANDLER_LOAD = "HandlerLoadError"  # the handler module or class cannot be found or imported
    HANDLER_INIT = "HandlerInitError"  # the handler's `initialize` raised
    HANDLER_ERROR = "HandlerError"  # the handler raised on a batch (or in describe_handle)
    #: the handler raised TorchServe's `PredictionException(message, status)`: `Failure.status`
    #: carries the status it asked for
    PREDICTION_EXCEPTION = "PredictionException"
    OUT_OF_MEMORY = "OutOfMemory"  # host or accelerator memory ran out
    BAD_OUTPUT = "BadHandlerOutput"  # wrong number of answers, or an answer not serialisable
    NOT_SUPPORTED = "NotSupported"  # the handler has nothing to describe
    INVALID_INPUT = "InvalidInput"  # one request the worker could not read: the client's fault
    #: a response body over the frontend's `max_response_size` (set by the frontend's reader)
    RESPONSE_TOO_LARGE = "ResponseTooLarge"
    #: the worker could not read a frame the frontend sent (its contents were invalid)
    BAD_FRAME = "BadFrame"
    #: the model's configuration does not fit its handler (an `async def handle` without
    #: `asyncCommunication: true`): the operator's mistake, named in the message
    MISCONFIGURED = "ModelConfigError"


class WorkerState(str, Enum):
    """A worker's life as the frontend's pool sees it (shown by the describe API)."""

    STARTING = "STARTING"
    READY = "READY"  # idle, waiting for a batch
    BUSY = "BUSY"  # running a batch
    RETIRING = "RETIRING"  # finishing its batch, then stopping
    STOPPING = "STOPPING"
    DEAD = "DEAD"

    @property
    def serving(self) -> bool:
        """Started and not on its way out: it answers batches and describe calls."""
        return self in (WorkerState.READY, WorkerState.BUSY)


#: `service_envelope` values (TorchServe's setting) and the class each one names in the
#: worker's `ts.torch_handler.request_envelope.<value>` module; the frontend checks the setting
#: against it, the worker loads the class
ENVELOPES = {
    "body": "BodyEnvelope",
    "json": "JSONEnvelope",
    "kserve": "KServeEnvelope",
    "kservev2": "KServev2Envelope",
}


def check_envelope_name(name: str) -> str:
    """`name` if it is an envelope tsctl has (or empty: none), else a ValueError naming it."""
    if name and name not in ENVELOPES:
        known = ", ".join(ENVELOPES)
        raise ValueError(f"unknown service_envelope {name!r}: use one of {known}")
    return name


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load and run its model; the defaults are here only.

    The registry builds one per model version; the pool fills in `worker_id`, `threads` and
    `gpu_id` for each worker it starts (`dataclasses.replace`)."""

    model_name: str
    model_dir: str
    handler: str
    manifest: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    #: the model's `model-config.yaml`, as the handler's `context.model_yaml_config`
    model_yaml_config: Mapping[str, Any] = field(default_factory=dict)
    #: TorchServe's `limit_max_image_pixels`: PIL's decompression-bomb check stays on
    limit_max_image_pixels: bool = True
    startup_timeout: float = 120.0  # seconds to load the handler
    service_envelope: str = ""  # "" = none; else a key of ENVELOPES
    dep_path: str = ""  # "" = none; else a folder of per-model packages, put on sys.path
    #: the metrics configuration's model metrics: (name, unit, dimension names, kind)
    declared_metrics: tuple[tuple[str, str, tuple[str, ...], str], ...] = ()
    worker_id: str = ""
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    #: `threads` is tsctl's default share, not a setting: the worker may serve with fewer
    #: when more do not make its batches faster (`tsctl.worker.threads.ThreadTuner`)
    tune_threads: bool = False
    gpu_id: int | None = None
    #: a multi-process instance (torchrun, `tsctl.worker.ranks`): TorchServe's parallelType
    #: ("tp", "pp", "pptp"; "" for one process) and its number of ranks (0 for one process);
    #: `gpu_id` is then the first of its GPUs, and each rank's context has its LOCAL_RANK
    parallel_type: str = ""
    parallel_level: int = 0
    #: `asyncCommunication: true`: the worker runs its handler on an event loop, several
    #: batches in flight at once, each answered when it is done (`tsctl.worker.async_service`)
    async_communication: bool = False


@value_class
class Failure:
    """An error reported as data: `kind` chooses the status, `message` is shown to clients."""

    kind: FailureKind
    message: str
    detail: str = ""  # e.g. a traceback: for logs, never for clients
    #: with `PREDICTION_EXCEPTION`: the HTTP status the handler asked for; else 0
    status: int = 0


@dataclass(frozen=True)
class Assign:
    """The first frame a worker reads: what to load (model, handler, directory, settings).
    A worker may be started before its model is known, so this does not travel in argv."""

    spec: WorkerSpec


@dataclass(frozen=True)
class Hello:
    pid: int


@dataclass(frozen=True)
class InitFailed:
    failure: Failure


@value_class
class Part:
    """One named input of a request: a raw body, a multipart field or file, a form field."""

    name: str
    content_type: str
    data: bytes | bytearray | memoryview


@value_class
class WireRequest:
    request_id: str
    parts: Sequence[Part]
    headers: Sequence[tuple[str, str]] = ()


@value_class
class Batch:
    batch_id: int
    requests: Sequence[WireRequest]
    #: each request's entry in the frame's meta, encoded already (`codec.request_entry`,
    #: once per request as it is queued), or empty: the codec encodes them
    entries: Sequence[bytes] = ()


@value_class
class WireResponse:
    status: int = 200
    content_type: str = ""
    body: bytes | bytearray = b""
    headers: Sequence[tuple[str, str]] = ()
    reason: str = ""
    failure: Failure | None = None


@value_class
class CustomMetric:
    name: str
    unit: str
    kind: str  # counter | gauge | histogram
    value: float
    dimensions: dict[str, str]


@value_class
class Result:
    batch_id: int
    responses: Sequence[WireResponse] = ()
    #: set when the batch as a whole failed (the handler raised, or returned a wrong shape)
    failure: Failure | None = None
    handler_ms: float = 0.0
    #: metrics the handler emitted through `context.metrics` during this batch
    metrics: Sequence[CustomMetric] = ()


@dataclass(frozen=True)
class Stop:
    reason: str = ""


@value_class
class Chunk:
    """Intermediate answers of the running batch, one per request, before its `Result`."""

    batch_id: int
    responses: Sequence[WireResponse] = ()


@dataclass(frozen=True)
class Describe:
    pass


@dataclass(frozen=True)
class Described:
    body: bytes | bytearray = b""
    failure: Failure | None = None


Message = Assign | Hello | InitFailed | Batch | Result | Stop | Describe | Described | Chunk
