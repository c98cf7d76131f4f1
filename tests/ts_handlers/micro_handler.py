"""TorchServe's micro-batching example, on a TorchScript model: `handle` is a MicroBatching
that runs slices of `micro_batch_size` requests through preprocess/inference/postprocess
threads (`micro_batching` in model-config.yaml)."""

import json
import time
from pathlib import Path

import torch
from ts.handler_utils.micro_batching import MicroBatching
from ts.torch_handler.base_handler import BaseHandler


def hold(folder):
    """Keep the worker busy until the test creates `release` (the test queues a whole batch
    meanwhile, so that the next batch is full), or 60 s have passed (a failed test must not
    leave the worker stuck)."""
    (folder / "holding").touch()
    deadline = time.monotonic() + 60
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


class MicroBatchingHandler(BaseHandler):
    def __init__(self):
        super().__init__()
        self.handle = MicroBatching(self)

    def initialize(self, ctx):
        super().initialize(ctx)
        settings = ctx.model_yaml_config.get("micro_batching", {})
        if settings.get("parallelism"):
            self.handle.parallelism = settings["parallelism"]
        self.handle.micro_batch_size = settings.get("micro_batch_size", 1)

    def preprocess(self, data):
        rows = []
        for row in data:
            value = row.get("data") or row.get("body")
            if isinstance(value, (bytes, bytearray)):
                value = json.loads(value)
            if isinstance(value, dict) and "hold" in value:
                hold(Path(value["hold"]))
                value = {"data": [0.0, 0.0, 0.0]}
            rows.append(value["data"] if isinstance(value, dict) else value)
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data):
        index = self.handle.get_micro_batch_idx()
        return [{"output": row, "micro_batch": index} for row in data.tolist()]

    def describe_handle(self):
        return {"micro_batch_size": self.handle.micro_batch_size, **self.handle.parallelism}
