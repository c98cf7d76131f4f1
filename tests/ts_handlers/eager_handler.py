"""TorchServe's BaseHandler as is (loading, inference, postprocess, handle, explain routing);
only the inputs are decoded here: each request is a JSON list of 4 floats, in a `data` field
or the body (alone, or as `{"data": [...]}`).
"""

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler


class EagerHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            value = row.get("data") or row.get("body")
            if isinstance(value, (bytes, bytearray, str)):
                value = json.loads(value)
            rows.append(value["data"] if isinstance(value, dict) else value)
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def get_insights(self, tensor_data, _, target=0):
        """The gradient of output `target` with respect to the inputs."""
        inputs = tensor_data.clone().requires_grad_(True)
        self.model(inputs)[:, int(target)].sum().backward()
        return [{"target": int(target), "gradient": row} for row in inputs.grad.tolist()]

    def describe_handle(self):
        return {
            "mapping": self.mapping,
            "device": str(self.device),
            "map_location": self.map_location,
            "model_pt_path": os.path.basename(self.model_pt_path),
            "initialized": self.initialized,
            "model_class": type(self.model).__name__,
            "training": self.model.training,
        }
