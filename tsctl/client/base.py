"""The client library's interface: what a client of a tsctl (or TorchServe) server can do.

`ManagementClient` and `InferenceClient` are implemented twice, over REST
(`tsctl.client.rest`) and over gRPC (`tsctl.client.grpc_client`, TorchServe's protos), with
the same arguments, results and errors; `tsctl.client.connect` picks one. Results are small
dataclasses of TorchServe's JSON, except model descriptions, which are TorchServe's documents
as they come. A server's error is an `ApiError`; no answer at all is
`tsctl.errors.ServerUnreachable`. Clients are blocking; one client per thread.
"""

from __future__ import annotations

import json
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tsctl.errors import TsctlError

_Client = TypeVar("_Client", bound="Closing")


class ApiError(TsctlError):
    """The server answered with an error.

    `message` is the one line to show (REST: `404 ModelNotFoundException: Model not found: x`,
    gRPC: `NOT_FOUND: Model not found: x`); `detail` is the server's own message; `status` the
    HTTP status (REST) and `code` the gRPC status code's name (gRPC), the other one None;
    `kind` TorchServe's error type (REST), `body` the raw answer (REST)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        kind: str = "",
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = message if detail is None else detail
        self.kind = kind
        self.body = body


@dataclass(frozen=True)
class ModelEntry:
    """One registered model, as listed (`{"modelName", "modelUrl"}`)."""

    name: str
    url: str


@dataclass(frozen=True)
class ModelPage:
    """One page of the model list; `next_page_token` is where the next page starts (None on
    the last page)."""

    models: list[ModelEntry]
    next_page_token: int | None


@dataclass(frozen=True)
class Input:
    """One input of a prediction request: a part of a multipart request (REST) or an entry of
    the request's `input` map (gRPC), under `name`."""

    name: str
    data: bytes
    content_type: str = "application/octet-stream"
    filename: str | None = None  # REST: the part's file name (default: `name`)


@dataclass(frozen=True)
class Prediction:
    """A model's answer. gRPC carries no content type: an answer that starts like JSON
    (`{` or `[`) is labelled `application/json` there, others get ""."""

    body: bytes
    content_type: str = ""
    status: int = 200

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def guess_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def file_inputs(files: Sequence[Path], content_type: str | None = None) -> list[Input]:
    """The inputs `tsctl infer` sends for files: one file as `data` (TorchServe's usual key),
    several under their file names (`a.jpg`, `a.jpg.2`, ... for repeated names), each with
    `content_type` or the type its name suggests."""
    if len(files) == 1:
        only = files[0]
        ctype = content_type or guess_type(only)
        return [Input("data", only.read_bytes(), ctype, only.name)]
    found: list[Input] = []
    used: set[str] = set()
    for path in files:
        name, n = path.name, 1
        while name in used:
            n += 1
            name = f"{path.name}.{n}"
        used.add(name)
        found.append(Input(name, path.read_bytes(), content_type or guess_type(path), path.name))
    return found


def as_inputs(inputs: bytes | Input | Sequence[Input]) -> list[Input]:
    """`predict`'s argument as a list: bytes are one octet-stream input named `data`."""
    if isinstance(inputs, bytes):
        return [Input("data", inputs)]
    if isinstance(inputs, Input):
        return [inputs]
    if not inputs:
        raise ValueError("a prediction needs at least one input")
    return list(inputs)


class Closing(ABC):
    """A client owns a connection: close it, or use the client in a `with` block."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class ManagementClient(Closing):
    """TorchServe's management API: list, describe, register, scale, unregister, set-default.

    The status-returning calls answer TorchServe's status message (its `{"status": ...}`),
    e.g. `Model "x" Version: 1.0 registered with 1 initial workers`."""

    @abstractmethod
    def list_models(self, limit: int = 100, next_page_token: int = 0) -> ModelPage:
        """One page of the registered models, sorted by name."""

    def all_models(self, page_size: int = 100) -> list[ModelEntry]:
        """Every registered model, page by page."""
        models: list[ModelEntry] = []
        token: int | None = 0
        while token is not None:
            page = self.list_models(page_size, token)
            models.extend(page.models)
            token = page.next_page_token
        return models

    @abstractmethod
    def describe(
        self,
        name: str,
        version: str | None = None,
        *,
        all_versions: bool = False,
        customized: bool = False,
    ) -> list[dict[str, Any]]:
        """TorchServe's description documents (one per version): the default version, or
        `version`, or every version; `customized` adds the handler's `describe_handle`."""

    @abstractmethod
    def register(
        self,
        url: str,
        *,
        model_name: str | None = None,
        handler: str | None = None,
        runtime: str | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        response_timeout: int | None = None,
        startup_timeout: int | None = None,
    ) -> str:
        """Register an archive (a file in the model store, or a URL the server allows); None
        leaves a setting to the archive and the server. `max_batch_delay` is in
        milliseconds, the timeouts in seconds; `synchronous` waits for the workers."""

    @abstractmethod
    def scale(
        self,
        name: str,
        min_workers: int,
        *,
        max_workers: int | None = None,
        version: str | None = None,
        synchronous: bool = True,
    ) -> str:
        """Set a model version's workers (the default version unless `version`)."""

    @abstractmethod
    def unregister(self, name: str, version: str | None = None) -> str:
        """Unregister a model (or one version) once its requests finish."""

    @abstractmethod
    def set_default(self, name: str, version: str) -> str:
        """Make `version` the one requests without a version go to."""


class InferenceClient(Closing):
    """TorchServe's inference API: predictions and the health check."""

    @abstractmethod
    def predict(
        self, model: str, inputs: bytes | Input | Sequence[Input], version: str | None = None
    ) -> Prediction:
        """One request to `model` (its default version unless `version`). One input travels
        as the request's body with its content type (REST) or under its name (gRPC);
        several as one multipart request (REST) or the request's `input` map (gRPC)."""

    @abstractmethod
    def ping(self) -> str:
        """The server's health status, `Healthy` when it serves."""


def status_message(doc: object) -> str:
    """TorchServe's `{"status": message}` answer, as its message."""
    if isinstance(doc, dict) and isinstance(doc.get("status"), str):
        return str(doc["status"])
    return json.dumps(doc)


def status_text(msg: str) -> str:
    """A gRPC management answer's `msg`: TorchServe's plain status sentence, or the
    `{"status": message}` document older tsctl servers sent."""
    try:
        doc = json.loads(msg)
    except ValueError:
        return msg
    return status_message(doc) if isinstance(doc, dict) else msg


def model_page(doc: object) -> ModelPage:
    """A model list page (`{"nextPageToken"?: "N", "models": [...]}`)."""
    if not isinstance(doc, dict):
        raise unexpected(doc)
    try:
        models = [
            ModelEntry(str(m["modelName"]), str(m["modelUrl"])) for m in doc.get("models", [])
        ]
        token = doc.get("nextPageToken")
        return ModelPage(models, int(token) if token is not None else None)
    except (KeyError, TypeError, ValueError):
        raise unexpected(doc) from None


def descriptions(doc: object) -> list[dict[str, Any]]:
    """Model description documents (a JSON list of objects)."""
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise unexpected(doc)
    return doc


def unexpected(doc: object) -> TsctlError:
    shown = json.dumps(doc)
    return TsctlError(f"the server answered an unexpected document: {shown[:200]}")
