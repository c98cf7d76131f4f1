"""`base`: tensor in, tensor out, JSON. tsctl's friendlier face of TorchServe's BaseHandler.

Model loading is TorchServe's `BaseHandler.initialize` (tsctl/worker/compat/ts/torch_handler/
base_handler.py): TorchScript, eager (`modelFile` + state_dict), ONNX or AOT-compiled. Only
the input side differs: each request is one input, a JSON array (or a JSON body holding one
under `data`, `input` or `instances`) that becomes a float tensor; the batch is stacked, run
once, and each row's output is answered as a JSON list.

Imported by the worker's loader, after `install_compat_path()` has made `ts` importable.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from ts.torch_handler._per_request import request_value
from ts.torch_handler.base_handler import BaseHandler as TorchServeBaseHandler


def main_input(row: Any) -> Any:
    """The input of a request: its `data` or `body` (`request_value`), else its first field."""
    value = request_value(row)
    if value is None and isinstance(row, dict):
        return next(iter(row.values()), None)
    return value


class BaseHandler(TorchServeBaseHandler):
    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        tensors = []
        for row in data:
            value = main_input(row)
            if isinstance(value, (bytes, bytearray, str)):
                value = json.loads(value)
            if isinstance(value, dict):
                value = value.get("data", value.get("input", value.get("instances")))
            tensors.append(torch.as_tensor(value, dtype=torch.float32))
        return torch.stack(tensors).to(self.device)

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        rows: list[Any] = data.tolist()
        return rows
