"""The handler's `context`: what TorchServe handlers read and set, with the same names.

A worker has one `Context`; before each batch the service gives it one `RequestProcessor` per
request (headers in, status and headers out), so `idx` in every method is the request's
position in the batch, as in TorchServe. TorchServe's `ts.context` re-exports these classes
(tsctl/worker/compat/ts/context.py), and the constructor takes TorchServe's positional
arguments, so handler tests that build a context themselves keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RequestProcessor:
    """Per request: its headers, and the status and headers the handler sets for its answer.

    Header names are matched exactly first, then regardless of case (HTTP names are
    case-insensitive, and the frontend may normalise them). As in TorchServe, each input part's
    name maps to `{"content-type": ...}` beside the request's own headers.
    """

    def __init__(self, request_header: Mapping[str, Any]) -> None:
        self._request_header = dict(request_header)
        self._folded: dict[str, Any] | None = None
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}

    def get_request_property(self, key: str) -> Any:
        value = self._request_header.get(key)
        if value is None:
            if self._folded is None:
                self._folded = {k.lower(): v for k, v in self._request_header.items()}
            value = self._folded.get(key.lower())
        return value

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = int(code)
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


class Context:
    """Model-level facts for `initialize`, and per-request access during `handle`."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any],
        batch_size: int,
        gpu: int | None,
        server_version: str,
        limit_max_image_pixels: bool = True,
        metrics: Any = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties: dict[str, Any] = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": server_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.model_yaml_config: dict[str, Any] = model_yaml_config or {}
        self.request_ids: dict[int, str] = {}
        self._request_processor: list[RequestProcessor] = []
        self.metrics: Any = metrics
        #: continuous batching (TorchServe's): one callable per request of the batch, given its
        #: answer: True ends its stream, False streams on (`ts_stream_next`), None: no stream
        self.stopping_criteria: Any = None
        #: the stateful-session headers' names (TorchServe's defaults)
        self.header_key_sequence_id = "ts_request_sequence_id"
        self.header_key_sequence_start = "ts_request_sequence_start"
        self.header_key_sequence_end = "ts_request_sequence_end"
        #: set by the worker for each batch: sends intermediate answers (streaming handlers)
        self.send_intermediate: Any = None

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    @property
    def request_processor(self) -> list[RequestProcessor]:
        return self._request_processor

    @request_processor.setter
    def request_processor(self, value: list[RequestProcessor]) -> None:
        self._request_processor = value

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Any:
        return self._request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self._request_processor[idx].get_request_properties()

    def get_sequence_id(self, idx: int) -> Any:
        """The sequence id of a stateful (sequence batching) request, from its header."""
        return self.get_request_header(idx, self.header_key_sequence_id)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self._request_processor[idx]
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if idx < len(self._request_processor):
            self._request_processor[idx].report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self._request_processor:
            processor.report_status(code, phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self._request_processor[idx].get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._request_processor[idx].add_response_property(key, value)
