"""The MLP's handler, the same file for tsctl and TorchServe (their common handler contract).

One class: `initialize(context)` loads the TorchScript file named by the manifest's
`serializedFile` from the model directory; `handle(data, context)` turns each request's `body`
(16 floats as JSON: already parsed when sent as application/json, else bytes or str), or the
one input tensor of an Open Inference Protocol request (tsctl's `{name: tensor}` rows), into a
row, runs the stacked batch once, and answers each request with its 4 output floats.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


class MlpHandler:
    def __init__(self) -> None:
        self.model: torch.jit.ScriptModule | None = None

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        serialized = context.manifest["model"]["serializedFile"]
        self.model = torch.jit.load(os.path.join(model_dir, serialized), map_location="cpu")
        self.model.eval()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        assert self.model is not None, "initialize() was not called"
        rows = []
        for row in data:
            body = row.get("body", row.get("data"))
            if body is None and row:  # an OIP request: its one input tensor
                body = next(iter(row.values()))
            if isinstance(body, (bytes, bytearray, str)):
                body = json.loads(body)
            rows.append(torch.as_tensor(body, dtype=torch.float32))
        with torch.inference_mode():
            out = self.model(torch.stack(rows))
        answers: list[Any] = out.tolist()
        return answers
