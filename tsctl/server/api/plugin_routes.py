"""Plugin endpoints (`tsctl.plugins.Endpoint`) on the inference and management APIs: running a
handler under the request's deadline and turning its `Reply` into a status, headers and body.
Where they are mounted, and in what order, is `tsctl.server.endpoint_routes`.

Runs on the daemon's event loop. A coroutine `handle` is awaited on the loop; a plain one runs
on the endpoints' own threads (`EndpointRoutes.executor`), so it may block. Either way it has
`default_response_timeout`: past it the client gets 504 and a late result is dropped (a
coroutine is cancelled; a thread cannot be, and runs on). A handler that raises, or answers
something that is not a usable `Reply`, fails that request alone: 500 with a message naming
the plugin and the request id, never the exception's text; ts_log.log has the plugin's name
and the traceback.

`call` is shared by both APIs: the inference API answers through `EndpointExchange` (tsctl's
HTTP/1.1 layer, with the built-in routes' body bound, access log, counts and headers), the
management API through its tornado handler (`rest_management.PluginHandler`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from tsctl.errors import TsctlError
from tsctl.plugins.api import Endpoint, EndpointRequest, Reply
from tsctl.server.api import http1
from tsctl.server.api.rest import log
from tsctl.server.api.rest_exchange import BodyExchange, request_info
from tsctl.server.endpoint_routes import EndpointRoutes
from tsctl.server.state import ServerState

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
#: headers the HTTP layer sets itself (a reply may not)
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
#: headers every answer carries, by lower-cased name: a reply's header of one of these names
#: replaces it (whatever its case)
_KNOWN = (
    "x-request-id",
    "Cache-Control",
    "Pragma",
    "Expires",
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
)
_CANONICAL = {name.lower(): name for name in _KNOWN}


class EndpointTimeout(TsctlError):
    """A plugin endpoint did not answer within `default_response_timeout`."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    type_name = "GatewayTimeoutException"


class EndpointFailed(TsctlError):
    """A plugin endpoint raised, or answered something that cannot be sent."""

    http_status = 500
    type_name = "InternalServerException"


class BadReply(Exception):
    """What is wrong with a handler's answer (for the log)."""


@dataclass(frozen=True)
class Answer:
    """A `Reply` as it is sent."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


async def call(
    state: ServerState,
    routes: EndpointRoutes,
    endpoint: Endpoint,
    request: EndpointRequest,
    request_id: str,
) -> Answer:
    """Run `endpoint.handle(request)` under the response timeout; its answer, or
    `EndpointTimeout` / `EndpointFailed` (logged)."""
    timeout = state.config.default_response_timeout
    info = request.info
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            if inspect.iscoroutinefunction(endpoint.handle):
                reply = await endpoint.handle(request)
            else:
                loop = asyncio.get_running_loop()
                reply = await loop.run_in_executor(routes.executor, endpoint.handle, request)
                if inspect.isawaitable(reply):  # a plain function that returned an awaitable
                    reply = await reply
        return answer_of(reply)
    except TimeoutError:
        if not deadline.expired():  # the plugin's own TimeoutError: a failure like any other
            log.exception(
                "plugin %s: %s %s failed (request id %s)",
                endpoint.name,
                info.method,
                info.path,
                request_id,
            )
        else:
            log.warning(
                "plugin %s: %s %s did not answer within default_response_timeout (%g s); "
                "answered 504 (request id %s), a late result is dropped",
                endpoint.name,
                info.method,
                info.path,
                timeout,
                request_id,
            )
            raise EndpointTimeout(
                f"the endpoint did not answer within default_response_timeout ({timeout:g} s)"
            ) from None
    except BadReply as exc:
        log.error(
            "plugin %s: %s %s answered wrongly (request id %s): %s",
            endpoint.name,
            info.method,
            info.path,
            request_id,
            exc,
        )
    except Exception:  # a plugin may raise anything: the request fails, never the server
        log.exception(
            "plugin %s: %s %s failed (request id %s)",
            endpoint.name,
            info.method,
            info.path,
            request_id,
        )
    raise EndpointFailed(
        f"internal server error in plugin endpoint {endpoint.name} (request id {request_id}); "
        "the server log (ts_log.log) has the details"
    )


def answer_of(reply: object) -> Answer:
    """A handler's `Reply` as it is sent; `BadReply` saying what is wrong with it."""
    if not isinstance(reply, Reply):
        raise BadReply(f"{type(reply).__name__} is not a Reply")
    status = reply.status
    if type(status) is not int or not 200 <= status <= 599:
        raise BadReply(f"status {status!r} is not a number from 200 to 599")
    body = reply.body
    if status in (204, 304):
        if body not in (b"", ""):
            raise BadReply(f"a {status} answer has no body")
        body = b""
    if isinstance(body, (dict, list)):
        try:
            data, content_type = json.dumps(body, indent=2).encode(), "application/json"
        except (TypeError, ValueError) as exc:
            raise BadReply(f"the body cannot be sent as JSON: {exc}") from None
    elif isinstance(body, str):
        data, content_type = body.encode(), "text/plain; charset=utf-8"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data, content_type = bytes(body), "application/octet-stream"
    else:
        raise BadReply(f"a body of type {type(body).__name__} (bytes, str, dict or list)")
    headers: dict[str, str] = {}
    given = reply.headers
    if not isinstance(given, Mapping):
        raise BadReply(f"headers of type {type(given).__name__}, not a dict")
    for name, value in given.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise BadReply(f"header name {name!r} is not a token")
        if not isinstance(value, str) or not _FIELD_VALUE.fullmatch(value):
            raise BadReply(f"header {name}: {value!r} is not a valid field value")
        lower = name.lower()
        if lower in _FRAMING:
            raise BadReply(f"header {name}: the server sets it")
        if lower == "content-type":
            content_type = value
        else:
            headers[_CANONICAL.get(lower, name)] = value
    if reply.content_type is not None:
        if not isinstance(reply.content_type, str) or not _FIELD_VALUE.fullmatch(
            reply.content_type
        ):
            raise BadReply(f"content_type {reply.content_type!r} is not a valid field value")
        content_type = reply.content_type
    return Answer(status, data, content_type, headers)


def query_of(query: str) -> dict[str, list[str]]:
    """A query string's values by name (blank values kept)."""
    return parse_qs(query, keep_blank_values=True) if query else {}


def model_of(params: Mapping[str, str]) -> str | None:
    """The model a request is for, for authorizers: the `{model}` or `{name}` capture."""
    return params.get("model") or params.get("name")


class EndpointExchange(BodyExchange):
    """A request to a plugin endpoint on the inference API (tsctl's HTTP/1.1 layer): authorized
    before its body is read, the body bounded by `max_request_size`, then the handler run by
    `call` and its answer written with the headers every answer has."""

    def __init__(
        self,
        state: ServerState,
        conn: http1.Connection,
        head: http1.RequestHead,
        routes: EndpointRoutes,
        endpoint: Endpoint,
        params: dict[str, str],
    ) -> None:
        super().__init__(state, conn, head)
        self.routes = routes
        self.endpoint = endpoint
        self.params = params
        self.task: asyncio.Task[None] | None = None
        self.info = request_info(conn, head, model_of(params))

    def headers_received(self) -> None:
        state = self.state
        try:
            if state.authorizers:
                state.authorize(self.info)
        except TsctlError as exc:
            self.refuse_early(exc)

    def finish(self) -> None:
        body = self.take_body()
        if body is None:
            return
        query = query_of(self.head.target.partition("?")[2])
        request = EndpointRequest(self.info, self.params, query, body)
        self.task = asyncio.ensure_future(self._run(request))
        self.state.track(self.task)

    async def _run(self, request: EndpointRequest) -> None:
        try:
            answer = await call(self.state, self.routes, self.endpoint, request, self.request_id)
        except TsctlError as exc:
            self.answer_error(exc)
            return
        self.answer(answer.status, answer.body, answer.content_type, answer.headers)

    def connection_lost(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client is gone: so is the coroutine waiting for it
        self.done(499)
