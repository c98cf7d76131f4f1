"""The errors tsctl raises on purpose, each carrying how it is reported.

Every surface maps these once: the CLI prints ``tsctl: error: <message>`` on stderr and exits
with ``exit_code`` (`tsctl.cli.app`); the REST APIs answer ``http_status`` with TorchServe's
JSON error shape (`tsctl.server.api.rest.error_response`); the gRPC APIs answer ``grpc_code``
(`tsctl.server.api.grpc_errors`). ``message`` is written for the person who caused the error
and must name the bad value; log detail never goes into it. Anything that is not a
``TsctlError`` is a bug.
"""

from __future__ import annotations

from typing import ClassVar


class TsctlError(Exception):
    """Base class: an error whose message is safe and useful to show to the user."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    #: the ``type`` field of TorchServe's JSON error shape
    type_name: ClassVar[str] = "InternalServerException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(TsctlError):
    """The caller gave a value that cannot be used (a bad flag, name, or file)."""

    exit_code = 2
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    type_name = "BadRequestException"


class ArchiveError(InvalidInput):
    """A model archive cannot be written, read or trusted; the message names the archive."""

    type_name = "InvalidModelException"


class UnsafeArchive(ArchiveError):
    """An archive entry would escape the target, is a link, or the archive expands too far."""


class DependencyInstallFailed(ArchiveError):
    """pip could not install a model's requirements (or took too long, or they name files
    outside the archive); the model is not loaded. TorchServe answers these 400 with the type
    `ModelException`; so does tsctl."""

    type_name = "ModelException"


class BadRequest(InvalidInput):
    """A request the server cannot use (malformed body, bad parameter)."""


class NotFound(TsctlError):
    exit_code = 1
    http_status = 404
    grpc_code = "NOT_FOUND"
    type_name = "ResourceNotFoundException"


class ModelNotFound(NotFound):
    type_name = "ModelNotFoundException"


class ModelVersionNotFound(NotFound):
    type_name = "ModelVersionNotFoundException"


class Conflict(TsctlError):
    """Something with that name already exists."""

    exit_code = 1
    http_status = 409
    grpc_code = "ALREADY_EXISTS"
    type_name = "ConflictStatusException"


class InvalidModelVersion(TsctlError):
    """A version that cannot be used that way: removing the default one while others exist
    (TorchServe: 403 `InvalidModelVersionException`; gRPC by its 403 rule, PERMISSION_DENIED)."""

    exit_code = 1
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    type_name = "InvalidModelVersionException"


NOT_ALLOWED_MESSAGE = "Requested method is not allowed, please refer to API document."


class MethodNotAllowed(TsctlError):
    exit_code = 1
    http_status = 405
    grpc_code = "UNIMPLEMENTED"
    type_name = "MethodNotAllowedException"


class RequestTooLarge(TsctlError):
    exit_code = 1
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    type_name = "RequestEntityTooLargeException"


class ServiceUnavailable(TsctlError):
    """The model cannot take the request now (no worker, or shutting down)."""

    exit_code = 1
    http_status = 503
    grpc_code = "UNAVAILABLE"
    type_name = "ServiceUnavailableException"


class QueueFull(ServiceUnavailable):
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        #: extra response headers: when to try again
        self.headers = {"Retry-After": str(retry_after)}


class StartingUp(ServiceUnavailable):
    """A model the server has not registered yet while it is still loading its start-up
    models: try again soon (a 404 now would be wrong a moment later, and proxies do not retry
    it)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


#: TorchServe's whole answer to a handler exception that is not a `PredictionException`
PREDICTION_FAILED = "Prediction failed"


class PredictionFailed(TsctlError):
    """The handler raised or answered wrongly (503 `InternalServerException`, as TorchServe).

    A handler's own exception is answered with TorchServe's bare `PREDICTION_FAILED` (its text
    may hold paths or data: it goes to model_log.log only); a `PredictionException` with the
    message the handler chose; a wrong answer (too few results, one that cannot be sent) with
    what was wrong with it.
    """

    exit_code = 1
    http_status = 503
    grpc_code = "UNAVAILABLE"  # TorchServe 0.12 maps this 503 as any other
    type_name = "InternalServerException"


class OutOfResources(PredictionFailed):
    """The handler ran out of host or accelerator memory (TorchServe: 507 "Out of resources")."""

    http_status = 507
    grpc_code = "INTERNAL"  # TorchServe maps a 5xx it has no rule for to INTERNAL


class StartFailed(TsctlError):
    """Something could not start: the daemon (`log_tail` then has the last lines of its log),
    or a model's workers."""

    http_status = 500
    type_name = "InternalServerException"

    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail or []


class WorkerStartFailed(StartFailed):
    """A worker could not load its handler; the message carries the handler's own error."""

    type_name = "WorkerInitializationException"


class WorkerDied(TsctlError):
    exit_code = 1
    http_status = 500
    grpc_code = "INTERNAL"
    type_name = "InternalServerException"


class InferenceTimeout(TsctlError):
    """No answer within the model's response timeout (TorchServe: 500 "Worker died.")."""

    exit_code = 1
    http_status = 500
    grpc_code = "DEADLINE_EXCEEDED"
    type_name = "InternalServerException"


class ServerUnreachable(TsctlError):
    """The CLI could not reach a server."""

    exit_code = 1


class HandlerChoseStatus(PredictionFailed):
    """The handler raised TorchServe's `PredictionException(message, status)`.

    The answer has that status (413 becomes 507, and one that is not 4xx/5xx becomes 500) and
    the handler's message, typed `InternalServerException` as TorchServe's frontend does; gRPC
    gets the code TorchServe maps the status to.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        status = status if 400 <= status <= 599 else 500  # an error must answer as one
        # the status is chosen per answer, not per class: shadow the class attributes
        vars(self).update(
            http_status=507 if status == 413 else status, grpc_code=grpc_code_for_status(status)
        )


#: TorchServe's mapping from an HTTP status to the gRPC code of a failed prediction
_GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",
    416: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_code_for_status(status: int) -> str:
    """The gRPC status code name TorchServe answers for a handler-chosen HTTP status."""
    if status in _GRPC_CODES:
        return _GRPC_CODES[status]
    if 400 <= status < 500:
        return "FAILED_PRECONDITION"
    return "INTERNAL" if 500 <= status < 600 else "UNKNOWN"


def prediction_failed(message: str, status: int = 0) -> PredictionFailed:
    """The error for a failed prediction: `status` is the one the handler chose, if any (a
    worker's `Failure.status`), else 0 for the usual 503."""
    return HandlerChoseStatus(message, status) if status else PredictionFailed(message)
