"""`ts.torch_handler.request_envelope.base.BaseEnvelope`: what every envelope shares.

An envelope wraps a handler's `handle(data, context)`: `parse_input(rows)` turns the batch's
request rows into the flat list of inputs the handler sees, `format_output(results)` turns the
handler's results back into one answer per request (TorchServe's two abstract methods).

tsctl's envelopes read each request on its own: the inputs of all requests are joined into one
list for the handler (one call per batch, however many inputs each request carries), and its
results are cut back into the requests' shares in order. A request that does not fit the
envelope is answered with an `EnvelopeInputError` and takes no part in the handler call, so one
malformed request never fails the others.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from tsctl.worker.envelope import EnvelopeInputError

Handle = Callable[[Any, Any], Any]


class BaseEnvelope(ABC):
    """Wraps `handle_fn`; `handle` is what the worker calls instead of it."""

    def __init__(self, handle_fn: Handle) -> None:
        self._handle_fn = handle_fn
        self.context: Any = None
        #: per request of the current batch: how many handler inputs it gave, or its error
        self._shares: list[int | EnvelopeInputError] = []

    def handle(self, data: Any, context: Any) -> Any:
        self.context = context
        if not data:  # TorchServe's load-time call `handle(None, context)`, or no requests
            return self._handle_fn(data, context)
        inputs = self.parse_input(data)
        results = self._handle_fn(inputs, context) if inputs else []
        return self.format_output(results)

    def describe_handle(self) -> Any:
        """The wrapped handler's `describe_handle()` (the describe API reaches the handler
        through its envelope), or None when it has none."""
        describe = getattr(getattr(self._handle_fn, "__self__", None), "describe_handle", None)
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


def request_body(row: Any, envelope: str, expected: str) -> Any:
    """The JSON document a request row carries: its `data` or `body` input (TorchServe's
    lookup), parsed when it arrived as bytes or text; the row itself when it has neither."""
    body = row.get("data") or row.get("body") if isinstance(row, dict) else None
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
