"""Request envelopes: TorchServe's `service_envelope` setting, applied to a handler's entry.

An envelope translates between a serving protocol's JSON (`json`: TensorFlow Serving's
`{"instances": [...]}`, `kserve`: KServe v1, `kservev2`: the Open Inference Protocol) and the
plain list of inputs a handler sees, and back. TorchServe applies one to every model of the
server; so does tsctl. The classes live in tsctl's `ts` package
(`ts.torch_handler.request_envelope.*`, TorchServe's module and class names), which the worker
puts first on `sys.path`; `wrap` imports them from there.

A request whose body does not fit the envelope fails alone: the envelope answers it with an
`EnvelopeInputError` instead of a result, and the other requests of the batch are answered as
usual. The worker reports such an answer as a `Failure` of kind `FailureKind.INVALID_INPUT`,
which the frontend answers 400.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# shared with the frontend, which checks `service_envelope` and answers input failures 400
from tsctl.ipc.messages import ENVELOPES
from tsctl.ipc.messages import check_envelope_name as check_name

if TYPE_CHECKING:
    from tsctl.worker.loader import Entry

__all__ = [
    "ENVELOPES",
    "EnvelopeInputError",
    "check_name",
    "split",
    "unwrap_handler",
    "wrap",
]


class EnvelopeInputError(ValueError):
    """One request's body does not fit the envelope; the message says why, for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def unwrap_handler(entry: Any) -> Any:
    """The handler object behind `entry`, the callable the worker calls for a batch.

    A bound method stands for its object; an object that wraps another one (a request
    envelope, `MicroBatching`) names it in `__wrapped__`, Python's attribute for "this wraps
    that" (`functools.wraps`), and is seen through. Anything else is the handler itself: a
    function handler is its own answer. The describe API uses this to reach the handler's
    `describe_handle` however it is wrapped.
    """
    found = entry
    for _ in range(16):  # wrappers nest two or three deep; a cycle must not loop forever
        found = getattr(found, "__self__", found)
        inner = getattr(found, "__wrapped__", None)
        if inner is None:
            return found
        found = inner
    return found


def wrap(entry: Entry, name: str | None) -> Entry:
    """`entry` inside the envelope `name`; `entry` itself when `name` is empty or None.

    Called after the handler is loaded and initialized (TorchServe calls a function handler's
    load-time `handle(None, context)` unwrapped too). `ts` must resolve to tsctl's package.
    """
    if not name:
        return entry
    from tsctl.worker.loader import HandlerLoadError

    try:
        check_name(name)
    except ValueError as exc:
        raise HandlerLoadError(str(exc)) from None
    module = importlib.import_module(f"ts.torch_handler.request_envelope.{name}")
    envelope = getattr(module, ENVELOPES[name])(entry)
    envelope.envelope_name = name  # for `split`
    wrapped: Entry = envelope.handle
    return wrapped


def split(entry: Entry) -> tuple[Entry, str]:
    """`(the handler's own entry, the envelope's name)` of an entry `wrap` made: `(entry, "")`
    when it has no envelope. The worker hands KServe v1 and OIP requests to the handler's own
    entry (their protocol is per request, not the model's `service_envelope`)."""
    owner: Any = getattr(entry, "__self__", None)
    name = getattr(owner, "envelope_name", "")
    if isinstance(name, str) and name:
        inner: Entry = owner.__wrapped__
        return inner, name
    return entry, ""
