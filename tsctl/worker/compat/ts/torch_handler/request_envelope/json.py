"""`ts.torch_handler.request_envelope.json.JSONEnvelope` (`service_envelope=json`).

TensorFlow Serving's row format: a request `{"instances": [i1, i2, ...]}` gives the handler one
input per instance (the instances of every request in the batch, in order), and each request is
answered `{"predictions": [r1, r2, ...]}`, its share of the results, as a JSON string.

As in TorchServe, an instance `{"b64": "..."}` becomes the decoded bytes, and so does any
`{"b64": "..."}` value of an instance that is an object.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope, request_list
from tsctl.worker.envelope import EnvelopeInputError

_EXPECTED = '{"instances": [...]}'


class JSONEnvelope(BaseEnvelope):
    """Instances in, predictions out; see the module docstring."""

    def parse_input(self, data: Any) -> list[Any]:
        return self._gather(data, self._instances)

    def format_output(self, data: Any) -> list[Any]:
        return self._scatter(data, self._predictions)

    def _instances(self, idx: int, row: Any) -> list[Any]:
        _, rows = request_list(row, "json", _EXPECTED, "instances")
        return [_decode_b64(instance) for instance in rows]

    def _predictions(self, idx: int, results: Any, count: int) -> str:
        return json.dumps({"predictions": results[:count]}, default=_plain)


def _decode_b64(instance: Any) -> Any:
    if not isinstance(instance, dict):
        return instance
    if list(instance) == ["b64"]:
        return _b64(instance["b64"])
    return {
        key: _b64(value["b64"]) if isinstance(value, dict) and list(value) == ["b64"] else value
        for key, value in instance.items()
    }


def _b64(text: Any) -> bytes:
    try:
        return b64decode(text)
    except (binascii.Error, TypeError, ValueError) as exc:
        message = f'an instance\'s "b64" value is not valid base64 ({exc})'
        raise EnvelopeInputError(message) from None


def _plain(value: Any) -> Any:
    """JSON for what handlers commonly return beside plain values: tensors, bytes."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
