"""Handler for resnet_faces, written against TorchServe's handler contract.

Each item of `data` is one image (a raw request body, or one multipart file); the answer for
each is a list of 136 floats: 68 landmarks as (x, y) pairs. No numpy and no torchvision: PIL
decodes, torch resizes and normalises.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from PIL import Image

SIZE = 224
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ResNetFacesHandler:
    def __init__(self) -> None:
        self.model: torch.jit.ScriptModule | None = None

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        weights = context.manifest["model"]["serializedFile"]
        self.model = torch.jit.load(os.path.join(model_dir, weights), map_location="cpu")
        self.model.eval()

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in data:
            raw = row.get("data") or row.get("body")
            if raw is None and row:
                raw = next(iter(row.values()))
            if isinstance(raw, str):
                raw = raw.encode("latin-1")
            images.append(_to_tensor(Image.open(io.BytesIO(raw))))
        return torch.stack(images)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[list[float]]:
        assert self.model is not None, "initialize() was not called"
        batch = self.preprocess(data)
        with torch.inference_mode():
            out = self.model(batch)
        return [[round(v, 5) for v in row] for row in out.tolist()]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    rgb = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    chw = pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).float().div_(255)
    return (chw - MEAN) / STD
