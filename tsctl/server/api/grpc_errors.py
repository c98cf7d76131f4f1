"""The gRPC APIs' one error funnel: what a servicer method raises becomes the call's status.

A `TsctlError` answers the gRPC code its class names (``grpc_code``) with its message, as the
REST funnel answers its ``http_status`` (`tsctl.server.api.rest.error_response`). Anything else
is a bug: its traceback goes to ``ts_log.log`` (logger ``tsctl.server``, ERROR) under a request
id (the call's ``x-request-id`` metadata when it is sane, else a new one), and the client gets
INTERNAL with a generic message naming that id (also sent as ``x-request-id`` trailing
metadata), never the exception's class or text. grpc's own `AbortError` (a method that called
``context.abort`` itself) and cancellation (``asyncio.CancelledError``, a `BaseException`)
pass through untouched. Without this, grpc.aio answers UNKNOWN with ``Unexpected <class>:
<text>``: internals to the client.

Each servicer method wears a decorator, `funnel` (one answer) or `funnel_stream` (an async
generator of answers), rather than the server wearing a ``grpc.aio.ServerInterceptor``: an
interceptor sees a method handler, not the call, so it would have to rebuild grpc's handler
tuple for each of the four call kinds and re-wrap each behaviour the way grpc.aio tells them
apart (coroutine function or async generator function); a decorator does that once, in plain
typed Python, where the method is written. `is_funnelled` lets a test check that none is
missed. `status_of` is the one TsctlError-to-code mapping, also used where an error is answered
in-band (``StreamPredictions2``'s per-request ``status``).

Runs on the daemon's event loop, like the servicers it wraps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from tsctl.errors import TsctlError
from tsctl.server.request import new_request_id

log = logging.getLogger("tsctl.server")

S = TypeVar("S")
R = TypeVar("R")

#: set on each wrapped method (`is_funnelled`)
_MARK = "__tsctl_grpc_funnel__"


def status_of(exc: TsctlError) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and details that answer `exc`."""
    return grpc.StatusCode[exc.grpc_code], exc.message


def internal_message(request_id: str) -> str:
    """What a client is told about a bug: nothing but where the operator finds it."""
    return (
        f"internal server error (request id {request_id}); "
        "the server log (ts_log.log) has the details"
    )


def request_id_of(context: aio.ServicerContext) -> str:
    """The call's sane ``x-request-id`` metadata, else a new request id."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "x-request-id" and isinstance(value, str):
            return new_request_id(value)
    return new_request_id(None)


async def _answer(exc: Exception, where: str, context: aio.ServicerContext) -> None:
    """Abort the call for `exc` (raises grpc's `AbortError`)."""
    if isinstance(exc, TsctlError):
        await context.abort(*status_of(exc))
    request_id = request_id_of(context)
    log.error("gRPC %s failed (request id %s)", where, request_id, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        internal_message(request_id),
        trailing_metadata=(("x-request-id", request_id),),
    )


def funnel(
    method: Callable[[S, Any, aio.ServicerContext], Awaitable[R]],
) -> Callable[[S, Any, aio.ServicerContext], Awaitable[R]]:
    """Wrap a servicer method that answers once (unary or client-streaming request)."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Any, context: aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except aio.AbortError:
            raise  # the method aborted the call itself: its status is already set
        except Exception as exc:
            await _answer(exc, method.__qualname__, context)
            raise  # not reached: `_answer` raises

    setattr(wrapper, _MARK, True)
    return wrapper


def funnel_stream(
    method: Callable[[S, Any, aio.ServicerContext], AsyncGenerator[R, None]],
) -> Callable[[S, Any, aio.ServicerContext], AsyncGenerator[R, None]]:
    """Wrap a servicer method that is an async generator of answers (server or bidirectional
    streaming). An error after some answers were sent ends the stream with its status."""

    @functools.wraps(method)
    async def wrapper(
        self: S, request: Any, context: aio.ServicerContext
    ) -> AsyncGenerator[R, None]:
        answers = method(self, request, context)
        try:
            # closed as soon as this generator is (a cancelled call): its `finally` runs now
            async with contextlib.aclosing(answers):
                async for answer in answers:
                    yield answer
        except aio.AbortError:
            raise
        except Exception as exc:
            await _answer(exc, method.__qualname__, context)
            raise  # not reached: `_answer` raises

    setattr(wrapper, _MARK, True)
    return wrapper


def is_funnelled(method: object) -> bool:
    """Whether `method` wears `funnel` or `funnel_stream`."""
    return bool(getattr(method, _MARK, False))
