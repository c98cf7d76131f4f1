"""Helpers for the request-envelope tests (test_envelopes*.py): a worker's `Context` during a
batch, and a handler that records what it saw. The `compat` fixture that lets `import ts` find
tsctl's package is in tests/e2e/conftest.py."""

from __future__ import annotations

from typing import Any

from tsctl.worker import envelope
from tsctl.worker.context import Context, RequestProcessor

MANIFEST = {"model": {"modelName": "echo", "modelVersion": "2.0", "handler": "echo.py"}}


def make_context(*headers: dict[str, str]) -> Context:
    """A worker's context during a batch of `len(headers)` requests."""
    context = Context("echo", "/nowhere", MANIFEST, len(headers), None, "test")
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    return context


class Recorder:
    """A handler that answers each input with a small record and keeps what it saw."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def handle(self, data: Any, context: Any) -> Any:
        self.calls.append(data)
        if data is None:
            return "initialized"
        return [{"echo": plain(item), "batch": len(data)} for item in data]

    def describe_handle(self) -> str:
        return "recorder"


def plain(item: Any) -> Any:
    return item.decode() if isinstance(item, bytes) else item


def wrapped(name: str, handler: Any = None) -> Any:
    return envelope.wrap(handler or Recorder().handle, name)
