"""`ts.torch_handler.request_envelope.body.BodyEnvelope` (`service_envelope=body`).

The handler sees each request's body (its `data` or `body` input) instead of the whole input
row, and its results are the answers as they are.
"""

from __future__ import annotations

from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope, row_input


class BodyEnvelope(BaseEnvelope):
    """Bodies in, results out unchanged."""

    def parse_input(self, data: Any) -> list[Any]:
        return [row_input(row) for row in data]

    def format_output(self, data: Any) -> Any:
        return data
