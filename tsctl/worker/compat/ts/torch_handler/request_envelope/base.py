"""`ts.torch_handler.request_envelope.base.BaseEnvelope`: what every envelope shares.

An envelope wraps a handler's `handle(data, context)`: `parse_input(rows)` turns the batch's
request rows into the flat list of inputs the handler sees, `format_output(results)` turns the
handler's results back into one answer per request (TorchServe's two abstract methods).

tsctl's envelopes read each request on its own: the inputs of all requests are joined into one
list for the handler (one call per batch, however many inputs each request carries), and its
results are cut back into the requests' shares in order. A request that does not fit the
envelope is answered with an `EnvelopeInputError` and takes no part in the handler call, so one
malformed request never fails the others. While the handler runs, the context's per-request
lists (`request_ids`, `request_processor`) hold only the requests it reads, in order, so the
`idx` a handler passes to `context.get_request_header(idx, ...)` or
`context.set_response_status(..., idx)` names one of them; the full lists are back when the
envelope writes the answers.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tsctl.worker.envelope import EnvelopeInputError, unwrap_handler

Handle = Callable[[Any, Any], Any]


class BaseEnvelope(ABC):
    """Wraps `handle_fn`; `handle` is what the worker calls instead of it."""

    def __init__(self, handle_fn: Handle) -> None:
        self._handle_fn = handle_fn
        #: what this envelope wraps, for `tsctl.worker.envelope.unwrap_handler`
        self.__wrapped__ = handle_fn
        self.context: Any = None
        #: per request of the current batch: how many handler inputs it gave, or its error
        self._shares: list[int | EnvelopeInputError] = []

    def handle(self, data: Any, context: Any) -> Any:
        self.context = context
        if not data:  # TorchServe's load-time call `handle(None, context)`, or no requests
            return self._handle_fn(data, context)
        self._shares = []  # filled by `_gather`; an envelope that does not use it rejects none
        inputs = self.parse_input(data)
        if not inputs:
            return self.format_output([])
        shares = self._shares
        readable = [i for i in range(len(data)) if i >= len(shares) or not _rejected(shares[i])]
        with _only_requests(context, readable):
            results = self._handle_fn(inputs, context)
        return self.format_output(results)

    def describe_handle(self) -> Any:
        """The wrapped handler's `describe_handle()` (the describe API reaches the handler
        through its envelope), or None when it has none."""
        describe = getattr(unwrap_handler(self._handle_fn), "describe_handle", None)
        return describe() if callable(describe) else None

    @abstractmethod
    def parse_input(self, data: Any) -> Any:
        """The request rows of a batch → the list of inputs the handler sees."""

    @abstractmethod
    def format_output(self, data: Any) -> Any:
        """The handler's results → one answer per request."""

    # helpers for the envelopes that read one request at a time

    def _gather(self, rows: Sequence[Any], parse_one: Callable[[int, Any], list[Any]]) -> list[Any]:
        """Join `parse_one(idx, row)` of every row; a row it rejects is remembered as failed."""
        joined: list[Any] = []
        self._shares = []
        for idx, row in enumerate(rows):
            try:
                inputs = parse_one(idx, row)
            except EnvelopeInputError as exc:
                self._shares.append(exc)
                continue
            self._shares.append(len(inputs))
            joined.extend(inputs)
        return joined

    def _scatter(self, results: Any, answer_one: Callable[[int, Any, int], Any]) -> list[Any]:
        """One answer per request: `answer_one(idx, its results, its input count)`, or its
        error. With a single readable request it gets the handler's results as they are (as in
        TorchServe, whatever their length); with several they must be one per input."""
        shares, self._shares = self._shares, []
        counts = [share for share in shares if isinstance(share, int)]
        several = len(counts) > 1
        if several:
            if isinstance(results, (str, bytes, bytearray)) or not isinstance(results, Sequence):
                raise TypeError(
                    f"the handler returned {type(results).__name__}, expected a list of "
                    f"{sum(counts)} results (one per input)"
                )
            if len(results) != sum(counts):
                raise ValueError(
                    f"the handler returned {len(results)} results for {sum(counts)} inputs from "
                    f"{len(counts)} requests: the envelope needs one result per input to give "
                    "each request its share"
                )
        answers: list[Any] = []
        cursor = 0
        for idx, share in enumerate(shares):
            if isinstance(share, EnvelopeInputError):
                answers.append(share)
                continue
            mine = results[cursor : cursor + share] if several else results
            cursor += share
            answers.append(answer_one(idx, mine, share))
        return answers


def row_input(row: Any) -> Any:
    """A request row's main input: its `data` part, else its `body` part (TorchServe's
    lookup: an empty `data` counts as missing); None when the row has neither or is no row."""
    if not isinstance(row, dict):
        return None
    return row.get("data") or row.get("body")


def request_body(row: Any, envelope: str, expected: str) -> Any:
    """The JSON document a request row carries: its main input (`row_input`), parsed when it
    arrived as bytes or text; the row itself when it has none."""
    body = row_input(row)
    if body is None:
        body = row
    if isinstance(body, (bytes, bytearray, memoryview, str)):
        try:
            body = json.loads(bytes(body) if not isinstance(body, str) else body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeInputError(
                f"the {envelope} envelope expects a JSON body like {expected}; "
                f"this body is not JSON ({exc})"
            ) from None
    if not isinstance(body, dict):
        raise EnvelopeInputError(
            f"the {envelope} envelope expects a JSON object like {expected}, "
            f"not a JSON {_json_type(body)}"
        )
    return body


def request_list(
    row: Any, envelope: str, expected: str, key: str
) -> tuple[dict[str, Any], list[Any]]:
    """The row's JSON document (`request_body`) and the list under `key` in it, which
    `envelope` requires."""
    body = request_body(row, envelope, expected)
    items = body.get(key)
    if not isinstance(items, list):
        raise EnvelopeInputError(
            f'the {envelope} envelope expects {expected}: the body has no "{key}" list'
        )
    return body, items


def _rejected(share: int | EnvelopeInputError) -> bool:
    return isinstance(share, EnvelopeInputError)


@contextmanager
def _only_requests(context: Any, keep: list[int]) -> Iterator[None]:
    """Narrow `context`'s per-request lists to the requests at positions `keep` (renumbered
    0, 1, ...) for the duration of the block; the full lists come back afterwards.

    The processors are the same objects, so a status or header the handler sets through a
    narrowed index lands on the right request. Nothing changes when every request is kept,
    or when the context has no such lists (a handler test's own stand-in).
    """
    processors = getattr(context, "request_processor", None)
    ids = getattr(context, "request_ids", None)
    if not isinstance(processors, list) or keep == list(range(len(processors))):
        yield
        return
    context.request_processor = [processors[i] for i in keep]
    if isinstance(ids, dict):
        context.request_ids = {new: ids[old] for new, old in enumerate(keep) if old in ids}
    try:
        yield
    finally:
        context.request_processor = processors
        if isinstance(ids, dict):
            context.request_ids = ids


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__
