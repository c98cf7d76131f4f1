"""Run one batch through the handler and turn its answers into wire responses.

Inputs are decoded as TorchServe does: a part whose content type is `application/json` becomes
the parsed object, `text/*` a `str`, anything else stays a `bytearray`. Each answer becomes
bytes: `bytes`/`bytearray` as they are, `str` as UTF-8, anything else as JSON. A request whose
input cannot be decoded at all (JSON nested deeper than Python's recursion limit) fails alone
as invalid input; the handler runs on the rest of its batch. A handler that raises, or returns
the wrong number of answers, fails the whole batch with a message saying which; an answer that
cannot be serialised fails only its own request. Failures are reported
by kind (`FailureKind`); the frontend chooses the status. A handler that raises TorchServe's
`PredictionException(message, code)` reports the code it asked for with its failure.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tsctl.ipc.messages import (
    Batch,
    Chunk,
    Described,
    Failure,
    FailureKind,
    Part,
    Result,
    WireResponse,
)
from tsctl.worker.context import Context, RequestProcessor
from tsctl.worker.envelope import EnvelopeInputError, unwrap_handler
from tsctl.worker.loader import Entry
from tsctl.worker.metrics import MetricsCache

log = logging.getLogger("tsctl.worker")


class PredictionException(Exception):
    """Raised by a handler to answer every request of its batch with `error_code` and
    `message` (TorchServe's `ts.utils.util.PredictionException` is this class)."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


def _out_of_memory(exc: BaseException) -> bool:
    """Host or accelerator memory ran out (TorchServe answers these 507 "Out of resources").

    torch names the accelerator's error `torch.OutOfMemoryError` in recent releases and
    `torch.cuda.OutOfMemoryError` in older ones (recent ones keep it as an alias); either
    counts, and neither is looked up unless the handler has imported torch.
    """
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    candidates = (
        getattr(torch, "OutOfMemoryError", None),
        getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
    )
    return any(isinstance(kind, type) and isinstance(exc, kind) for kind in candidates)


def _chosen_status(code: Any) -> int:
    """The HTTP status a `PredictionException` asks for: its `error_code` as an int (text
    such as "404" counts), or 500 when it is none (`None`, "oops", 0). A handler's odd code
    must not take the worker down; the frontend answers a code that is no error status 500."""
    try:
        status = int(code)
    except (TypeError, ValueError, OverflowError):
        return 500
    return status if status > 0 else 500


def failure_of(exc: Exception) -> Failure:
    """How a batch whose handler raised `exc` is reported to the frontend."""
    if isinstance(exc, PredictionException):
        # a subclass may skip PredictionException.__init__: read what it set, if anything
        message = getattr(exc, "message", None)
        if message is None:
            message = exc.args[0] if exc.args else type(exc).__name__
        code = getattr(exc, "error_code", None)
        return Failure(FailureKind.PREDICTION_EXCEPTION, str(message), status=_chosen_status(code))
    if _out_of_memory(exc):
        return Failure(FailureKind.OUT_OF_MEMORY, f"Out of resources: {type(exc).__name__}: {exc}")
    return Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")


def _last_of(produced: Iterator[Any], intermediate: Callable[[Sequence[Any]], None]) -> Any:
    """Send every list a generator handler yields but the last, which is the final answer."""
    last: Any = None
    for item in produced:
        if last is not None:
            intermediate(last)
        last = item
    return [] if last is None else last


class UndecodableInput(Exception):
    """A request's part that cannot be handed to the handler (a client's mistake)."""


def decode_value(part: Part) -> Any:
    """A part as the handler receives it; text that is not JSON (or UTF-8) stays bytes, as
    TorchServe hands it over. `UndecodableInput` for JSON that Python cannot hold."""
    media = part.content_type.split(";", 1)[0].strip().lower()
    data = part.data
    if media == "application/json":
        try:
            return json.loads(bytes(data))
        except ValueError:
            return data
        except RecursionError:
            raise UndecodableInput(f"input {part.name!r}: JSON nested too deeply") from None
    if media.startswith("text"):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return data
    return data


class Service:
    """A loaded handler and its context; `run` is called once per batch."""

    def __init__(self, entry: Entry, context: Context) -> None:
        self.entry = entry
        self.context = context

    def run(self, batch: Batch, send: Callable[[Chunk], None] | None = None) -> Result:
        """Run one batch. A handler that streams (yields lists, or calls
        `context.send_intermediate(answers)`) has each intermediate list sent through `send`
        as a `Chunk`; its last list is the final answer. Requests whose input cannot be
        decoded are answered with their failure and left out of the handler's batch."""
        refused: dict[int, WireResponse] = {}
        rows: list[dict[str, Any]] = []
        for i, request in enumerate(batch.requests):
            try:
                rows.append({p.name: decode_value(p) for p in request.parts})
            except UndecodableInput as exc:
                refused[i] = WireResponse(failure=Failure(FailureKind.INVALID_INPUT, str(exc)))
        if not rows:
            return Result(batch.batch_id, [refused[i] for i in range(len(batch.requests))])
        kept = [r for i, r in enumerate(batch.requests) if i not in refused]
        context = self.context
        context.request_ids = {i: r.request_id for i, r in enumerate(kept)}
        context.request_processor = [
            RequestProcessor(
                {**{p.name: {"content-type": p.content_type} for p in r.parts}, **dict(r.headers)}
            )
            for r in kept
        ]

        def merged(answers: Sequence[Any]) -> list[WireResponse]:
            """Responses in the batch's order: the handler's, and the refused requests'."""
            if not refused:
                return [self._response(i, a) for i, a in enumerate(answers)]
            handled = iter([self._response(i, a) for i, a in enumerate(answers)])
            short = WireResponse(failure=Failure(FailureKind.BAD_OUTPUT, "no answer for it"))
            return [refused.get(i) or next(handled, short) for i in range(len(batch.requests))]

        def intermediate(answers: Sequence[Any]) -> None:
            if send is not None:
                send(Chunk(batch.batch_id, merged(answers)))

        context.send_intermediate = intermediate
        started = time.perf_counter()
        try:
            answers = self.entry(rows, context)
            if inspect.isgenerator(answers):
                answers = _last_of(answers, intermediate)
        except Exception as exc:
            ids = ", ".join(r.request_id for r in batch.requests)
            log.error(
                "handler raised on the batch of request ids %s:\n%s", ids, traceback.format_exc()
            )
            return Result(batch.batch_id, failure=failure_of(exc), metrics=self._metrics())
        elapsed = (time.perf_counter() - started) * 1000
        if isinstance(answers, (str, bytes, bytearray)) or not isinstance(answers, Sequence):
            message = f"handler returned {type(answers).__name__}, expected a list of {len(rows)}"
            return Result(
                batch.batch_id, failure=Failure(FailureKind.BAD_OUTPUT, message), handler_ms=elapsed
            )
        if len(answers) != len(rows):
            message = f"handler returned {len(answers)} results for a batch of {len(rows)} requests"
            return Result(
                batch.batch_id, failure=Failure(FailureKind.BAD_OUTPUT, message), handler_ms=elapsed
            )
        return Result(batch.batch_id, merged(answers), handler_ms=elapsed, metrics=self._metrics())

    def describe(self) -> Described:
        """The handler object's `describe_handle()` answer, encoded like a prediction."""
        describe = getattr(unwrap_handler(self.entry), "describe_handle", None)
        if describe is None:
            return Described(
                failure=Failure(FailureKind.NOT_SUPPORTED, "the handler has no describe_handle")
            )
        try:
            answer = describe()
        except Exception as exc:
            log.error("describe_handle raised:\n%s", traceback.format_exc())
            return Described(
                failure=Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            )
        if answer is None:  # BaseHandler's default: nothing to describe
            return Described(
                failure=Failure(FailureKind.NOT_SUPPORTED, "describe_handle returned None")
            )
        if isinstance(answer, (bytes, bytearray)):
            return Described(answer)
        if isinstance(answer, str):
            return Described(answer.encode("utf-8"))
        try:
            return Described(json.dumps(answer, indent=2).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            return Described(failure=Failure(FailureKind.BAD_OUTPUT, f"not serialisable: {exc}"))

    def _metrics(self) -> list[Any]:
        cache = self.context.metrics
        return cache.take() if isinstance(cache, MetricsCache) else []

    def _response(self, idx: int, answer: Any) -> WireResponse:
        if isinstance(answer, EnvelopeInputError):
            return WireResponse(failure=Failure(FailureKind.INVALID_INPUT, answer.message))
        processor = self.context.request_processor[idx]
        headers = processor.get_response_headers()
        content_type = headers.get("content-type") or headers.get("Content-Type") or ""
        extra = [(k, v) for k, v in headers.items() if k.lower() != "content-type"]
        status = processor.get_response_status_code()
        reason = processor.get_response_status_phrase() or ""
        if isinstance(answer, (bytes, bytearray)):
            body = answer
        elif isinstance(answer, str):
            body = answer.encode("utf-8")
        else:
            try:
                body = json.dumps(answer, indent=2).encode("utf-8")
            except (TypeError, ValueError) as exc:
                message = f"handler output for request {idx} is not serialisable: {exc}"
                return WireResponse(failure=Failure(FailureKind.BAD_OUTPUT, message))
            content_type = content_type or "application/json"
        return WireResponse(status, content_type, body, extra, reason)
