"""`ts.torch_handler.request_envelope.kserve.KServeEnvelope` (`service_envelope=kserve`).

KServe's v1 protocol, as KServe's TorchServe integration forwards it: a request
`{"instances": [...]}` gives the handler one input per instance, and the request is answered
`{"predictions": [...]}`, or `{"explanations": [...]}` when it carries the header
`explain: True` (KServe's `:explain` verb). The body may arrive as JSON or as raw bytes.

TorchServe reads only the first request of a batch; tsctl reads each one and gives each its
share of the results, so batching works. Instances are passed on as they are (no base64
decoding: the handler decides, as in TorchServe).
"""

from __future__ import annotations

from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope, request_list

_EXPECTED = '{"instances": [...]}'


class KServeEnvelope(BaseEnvelope):
    """KServe v1 instances in, predictions (or explanations) out."""

    def parse_input(self, data: Any) -> list[Any]:
        return self._gather(data, self._instances)

    def format_output(self, data: Any) -> list[Any]:
        return self._scatter(data, self._answer)

    def _instances(self, idx: int, row: Any) -> list[Any]:
        _, instances = request_list(row, "kserve", _EXPECTED, "instances")
        return instances

    def _answer(self, idx: int, results: Any, count: int) -> dict[str, Any]:
        key = "explanations" if self._is_explain(idx) else "predictions"
        return {key: results}

    def _is_explain(self, idx: int = 0) -> bool:
        if self.context is None:
            return False
        return bool(self.context.get_request_header(idx, "explain") == "True")
