"""What every HTTP API of the daemon shares: request ids, the one error funnel, and the
JSON error shape `{"code": N, "type": "...", "message": "..."}` TorchServe clients parse.

Runs on the daemon's event loop. Handlers never block: anything slow is awaited.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import tornado.web

from tsctl.errors import NOT_ALLOWED_MESSAGE, MethodNotAllowed, NotFound, TsctlError
from tsctl.server.request import new_request_id

log = logging.getLogger("tsctl.server")

NOT_FOUND_MESSAGE = "Requested resource is not found, please refer to API document."


def base_headers(request_id: str) -> dict[str, str]:
    """Headers on every response, as TorchServe sends them."""
    return {
        "x-request-id": request_id,
        "Cache-Control": "no-cache; no-store, must-revalidate, private",
        "Pragma": "no-cache",
        "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
    }


def error_response(
    exc: BaseException | None, request_id: str = ""
) -> tuple[int, bytes, dict[str, str]]:
    """The one error funnel: (status, JSON body, extra headers) for any exception.

    A `TsctlError` shows its own message; anything else is a 500 whose details stay in the
    server log, never in the answer, which names the `request_id` the log has them under.
    """
    headers: dict[str, str] = dict(getattr(exc, "headers", {}))
    if isinstance(exc, TsctlError):
        code, kind, message = exc.http_status, exc.type_name, exc.message
    elif isinstance(exc, tornado.web.HTTPError) and exc.status_code == 405:
        code, kind, message = 405, MethodNotAllowed.type_name, NOT_ALLOWED_MESSAGE
    elif isinstance(exc, tornado.web.HTTPError) and exc.status_code < 500:
        code, kind = exc.status_code, "BadRequestException"
        message = exc.log_message or exc.reason or "bad request"
    else:
        code, kind = 500, "InternalServerException"
        where = f" (request id {request_id})" if request_id else ""
        message = f"internal server error{where}; the server log (ts_log.log) has the details"
    body = json.dumps({"code": code, "type": kind, "message": message}, indent=2).encode()
    return code, body, headers


class ApiHandler(tornado.web.RequestHandler):
    """Base handler: `x-request-id` on every response and errors in TorchServe's shape."""

    request_id = ""

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.request_id = new_request_id(self.request.headers.get("x-request-id"))
        for name, value in base_headers(self.request_id).items():
            self.set_header(name, value)
        state = self.settings.get("state")
        if state is not None:
            for name, value in state.cors.items():
                self.set_header(name, value)

    def write_json(self, doc: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc, indent=2))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        code, body, headers = error_response(exc, self.request_id)
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(body)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, TsctlError):
            status_code = exc.http_status
        super().send_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, (TsctlError, tornado.web.HTTPError)):
            return  # an answer, not a server fault: the access log records it
        request = self.request
        log.error(
            "%s %s failed (request id %s)",
            request.method,
            request.uri,
            self.request_id,
            exc_info=(typ, value, tb),
        )


class NotFoundHandler(ApiHandler):
    """Any unknown path: TorchServe's 404."""

    def prepare(self) -> None:
        raise NotFound(NOT_FOUND_MESSAGE)


def access_line(
    client: str, method: str | None, uri: str | None, version: str, status: int, ms: float
) -> str:
    """One access-log line, TorchServe's layout (the last number is milliseconds)."""
    return f'/{client} "{method} {uri} {version}" {status} {ms:.0f}'


def log_request(handler: tornado.web.RequestHandler) -> None:
    state = handler.settings.get("state")
    if state is not None:
        status = handler.get_status()
        request = handler.request
        ms = request.request_time() * 1000
        peer = getattr(getattr(request.connection, "context", None), "address", None)
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        state.access_log.write(
            access_line(client, request.method, request.uri, request.version, status, ms)
        )
        state.answered(status)
