"""KServe v1 and the Open Inference Protocol (v2) over REST, on the inference port.

Runs on the daemon's event loop; nothing here blocks. `route` answers the protocols' paths (the
inference API's router calls it for `/v1/...` and `/v2...`):

- KServe v1: `GET /v1/models`, `GET /v1/models/{m}` (ready state), `POST /v1/models/{m}:predict`
  and `:explain` (`explain: True` added to the request's headers, as `/explanations` does);
- OIP: `GET /v2` (server metadata), `/v2/health/live`, `/v2/health/ready`,
  `GET /v2/models/{m}[/versions/{v}]` (model metadata), `.../ready`, `POST .../infer`.

Inference requests take the path `/predictions` takes (`rest_exchange.PredictionExchange`: the
same authorization, body bound, queue, batching, workers, access log and metrics), with the body
wrapped in one `Part` whose media type names the protocol (`tsctl.ipc.oip`): the daemon never
parses a tensor or an OIP body; it only checks `Inference-Header-Content-Length` against the
body's length. The worker decodes the request and encodes the protocol's answer. Every error
of these paths is answered `{"error": "<message>"}` with the status the error class carries
(KServe's and Triton's shape, for v1 as for v2). Health and readiness paths ask no authorizer.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tsctl import __version__
from tsctl.errors import NOT_ALLOWED_MESSAGE, BadRequest, MethodNotAllowed, NotFound, TsctlError
from tsctl.ipc.messages import Part
from tsctl.ipc.oip import HEADER_LENGTH, KSERVE_V1_MEDIA, PART_NAME, media_type
from tsctl.server import readiness
from tsctl.server.api import http1
from tsctl.server.api.rest import error_response
from tsctl.server.api.rest_exchange import FixedExchange, PredictionExchange, request_info
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState

#: what `GET /v2` reports
SERVER_NAME = "tsctl"
EXTENSIONS = ("binary_tensor_data",)
_V1 = re.compile(r"^/v1/models(?:/([^/:]+)(?::(predict|explain))?)?/?$")
_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?/?$")
_TENSOR_KEYS = ("name", "datatype", "shape")


def protocol_error(exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    """(status, `{"error": message}`, extra headers) for `exc`: the REST funnel's status and
    message (a 500's details stay in the log), in these protocols' shape."""
    status, body, headers = error_response(exc)
    message = json.loads(body)["message"]
    return status, json.dumps({"error": message}).encode(), headers


class ProtocolExchange(PredictionExchange):
    """An inference request of one of these protocols: its body forwarded as one part."""

    streams = False
    media = KSERVE_V1_MEDIA

    def answer_error(self, exc: BaseException) -> None:
        status, body, extra = protocol_error(exc)
        self.answer(status, body, extra=extra)

    def _parts(self, body: bytes) -> list[Part]:
        if not body:
            raise BadRequest("the request has no body")
        return [Part(PART_NAME, self.media, body)]


class OipInferExchange(ProtocolExchange):
    """`POST /v2/models/{m}[/versions/{v}]/infer`: the body as it came, the JSON header's
    length from `Inference-Header-Content-Length` (the whole body when absent)."""

    def _parts(self, body: bytes) -> list[Part]:
        if not body:
            raise BadRequest("the request has no body")
        given = self.head.get(HEADER_LENGTH.lower())
        length = len(body)
        if given:
            try:
                length = int(given)
            except ValueError:
                raise BadRequest(f"{HEADER_LENGTH} is not a number: {given!r}") from None
            if not 0 < length <= len(body):
                raise BadRequest(
                    f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes"
                )
        return [Part(PART_NAME, media_type(length), body)]


class DocumentExchange(FixedExchange):
    """A JSON document with its status (or an error), in these protocols' error shape."""

    def __init__(
        self,
        state: ServerState,
        conn: http1.Connection,
        head: http1.RequestHead,
        answer: Any,
        status: int = 200,
    ) -> None:
        super().__init__(state, conn, head, answer)
        self.status = status

    def answer_error(self, exc: BaseException) -> None:
        status, body, extra = protocol_error(exc)
        self.answer(status, body, extra=extra)

    def finish(self) -> None:
        if isinstance(self.fixed, TsctlError):
            self.answer_error(self.fixed)
        else:
            self.answer(self.status, json.dumps(self.fixed).encode())


def route(
    state: ServerState, conn: http1.Connection, head: http1.RequestHead
) -> http1.Exchange | None:
    """The exchange for a KServe v1 or OIP path; None for a path that is neither."""
    path, method = head.path, head.method
    v1 = _V1.match(path)
    if v1 is not None:
        model, verb = v1.groups()
        if verb is not None:
            if method != "POST":
                return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
            explain = verb == "explain"
            return ProtocolExchange(state, conn, head, model, None, explain)
        if method != "GET":
            return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
        if model is None:
            return _document(state, conn, head, lambda: {"models": sorted(state.registry.models)})
        return _readiness(state, conn, head, model, None, v1=True)
    if path in ("/v2", "/v2/"):
        return _document(state, conn, head, _server_metadata)
    if path in ("/v2/health/live", "/v2/health/ready"):
        if method != "GET":
            return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
        if path.endswith("live"):
            live = readiness.server_live(state)
            return DocumentExchange(state, conn, head, {"live": live}, 200 if live else 503)
        ready = readiness.server_ready(state)
        return DocumentExchange(state, conn, head, {"ready": ready}, 200 if ready else 503)
    v2 = _V2_MODEL.match(path)
    if v2 is not None:
        model, version, verb = v2.groups()
        if verb == "infer":
            if method != "POST":
                return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
            return OipInferExchange(state, conn, head, model, version, False)
        if method != "GET":
            return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
        if verb == "ready":
            return _readiness(state, conn, head, model, version, v1=False)
        return _document(state, conn, head, lambda: _model_metadata(state, model, version), model)
    if path.startswith(("/v1/", "/v2/")):
        return _refused(state, conn, head, NotFound(f"no such path: {path}"))
    return None


def _refused(
    state: ServerState, conn: http1.Connection, head: http1.RequestHead, error: TsctlError
) -> http1.Exchange:
    return DocumentExchange(state, conn, head, error)


def _document(
    state: ServerState,
    conn: http1.Connection,
    head: http1.RequestHead,
    build: Any,
    model: str | None = None,
) -> http1.Exchange:
    """A document for a GET that needs the inference token (when tokens are on) and the
    authorizers' leave; `model`: the model it is about, if any."""
    if head.method != "GET":
        return _refused(state, conn, head, MethodNotAllowed(NOT_ALLOWED_MESSAGE))
    try:
        if state.authorizers:
            state.authorize(request_info(conn, head, model))
        answer = build()
    except TsctlError as exc:
        answer = exc
    return DocumentExchange(state, conn, head, answer)


def _readiness(
    state: ServerState,
    conn: http1.Connection,
    head: http1.RequestHead,
    model: str,
    version: str | None,
    v1: bool,
) -> http1.Exchange:
    """A model's ready state (no token): 200 when ready, 503 when not, 404 when unknown."""
    try:
        state.registry.get(model, version)
    except TsctlError as exc:
        return _refused(state, conn, head, exc)
    ready = readiness.model_ready(state, model, version)
    doc: dict[str, Any] = {"name": model, "ready": ready}
    if not v1 and version is not None:
        doc["version"] = version
    return DocumentExchange(state, conn, head, doc, 200 if ready else 503)


def _server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def _model_metadata(state: ServerState, name: str, version: str | None) -> dict[str, Any]:
    """OIP model metadata; `inputs` and `outputs` as model-config.yaml declares them (lists
    of `{name, datatype, shape}`), empty when it declares none."""
    mv = state.registry.get(name, version)
    return {
        "name": mv.name,
        "versions": sorted(state.registry.models.get(name, {})),
        "platform": "pytorch",
        "inputs": _declared(mv, "inputs"),
        "outputs": _declared(mv, "outputs"),
    }


def _declared(mv: ModelVersion, key: str) -> list[dict[str, Any]]:
    declared = mv.yaml_config.get(key)
    if not isinstance(declared, list):
        return []
    return [
        {k: tensor[k] for k in _TENSOR_KEYS if k in tensor}
        for tensor in declared
        if isinstance(tensor, dict)
    ]
