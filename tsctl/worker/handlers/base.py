"""`base`: tensor in, tensor out, JSON. The class other built-in handlers extend.

`initialize` loads the archive's model: a TorchScript file, or an eager model (the single
`torch.nn.Module` class in `modelFile`) with a state_dict from `serializedFile`. Each request
is one input: a JSON array (or a JSON body holding one) becomes a float tensor; the batch is
stacked, run once, and each row's output is answered as a JSON list.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from typing import Any

import torch

from tsctl.worker.context import Context


def request_value(row: dict[str, Any]) -> Any:
    """The main input of a request: `data`, else `body`, else its first field."""
    for key in ("data", "body"):
        if row.get(key) is not None:
            return row[key]
    return next(iter(row.values()), None)


class BaseHandler:
    def __init__(self) -> None:
        self.model: Any = None
        self.device = torch.device("cpu")
        self.context: Context | None = None
        self.manifest: dict[str, Any] = {}
        self.initialized = False

    def initialize(self, context: Context) -> None:
        self.context = context
        self.manifest = context.manifest
        properties = context.system_properties
        model_dir = properties["model_dir"]
        gpu = properties.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu}")
        model = self.manifest.get("model", {})
        serialized = model.get("serializedFile")
        weights = os.path.join(model_dir, serialized) if serialized else None
        if model.get("modelFile"):
            self.model = self._load_eager(model_dir, model["modelFile"], weights)
        elif weights:
            self.model = torch.jit.load(weights, map_location=self.device)  # type: ignore[no-untyped-call]
        else:
            raise ValueError("the archive has neither a serialized file nor a model file")
        self.model.eval()
        self.initialized = True

    def _load_eager(self, model_dir: str, model_file: str, weights: str | None) -> Any:
        if model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        module = importlib.import_module(model_file.removesuffix(".py"))
        classes = [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module)
        ]
        if len(classes) != 1:
            raise ValueError(f"{model_file} must define exactly one torch.nn.Module class")
        model = classes[0]()
        if weights:
            state = torch.load(weights, map_location=self.device, weights_only=True)
            model.load_state_dict(state)
        return model.to(self.device)

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        tensors = []
        for row in data:
            value = request_value(row)
            if isinstance(value, (bytes, bytearray, str)):
                value = json.loads(value)
            if isinstance(value, dict):
                value = value.get("data", value.get("input", value.get("instances")))
            tensors.append(torch.as_tensor(value, dtype=torch.float32))
        return torch.stack(tensors).to(self.device)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(data, *args, **kwargs)
        return out

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        rows: list[Any] = data.tolist()
        return rows

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[Any]:
        self.context = context
        return self.postprocess(self.inference(self.preprocess(data)))
