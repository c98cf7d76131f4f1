"""Request envelopes: TorchServe's `service_envelope` setting, applied to a handler's entry.

An envelope translates between a serving protocol's JSON (`json`: TensorFlow Serving's
`{"instances": [...]}`, `kserve`: KServe v1, `kservev2`: the Open Inference Protocol) and the
plain list of inputs a handler sees, and back. TorchServe applies one to every model of the
server; so does tsctl. The classes live in tsctl's `ts` package
(`ts.torch_handler.request_envelope.*`, TorchServe's module and class names), which the worker
puts first on `sys.path`; `wrap` imports them from there.

A request whose body does not fit the envelope fails alone: the envelope answers it with an
`EnvelopeInputError` instead of a result, and the other requests of the batch are answered as
usual. The worker reports such an answer as a `Failure` of kind `INPUT_FAILURE_KIND`, which the
frontend answers 400.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tsctl.worker.loader import Entry

#: `service_envelope` values and the class each names in `ts.torch_handler.request_envelope.X`
ENVELOPES = {
    "body": "BodyEnvelope",
    "json": "JSONEnvelope",
    "kserve": "KServeEnvelope",
    "kservev2": "KServev2Envelope",
}
#: the `Failure.kind` of a request the envelope could not read (the frontend answers 400)
INPUT_FAILURE_KIND = "InvalidInput"


class EnvelopeInputError(ValueError):
    """One request's body does not fit the envelope; the message says why, for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_name(name: str) -> str:
    """`name` if it is an envelope tsctl has (or empty: none), else a ValueError naming it."""
    if name and name not in ENVELOPES:
        known = ", ".join(ENVELOPES)
        raise ValueError(f"unknown service_envelope {name!r}: use one of {known}")
    return name


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
    wrapped: Entry = envelope.handle
    return wrapped
