"""Handler for resnet_faces, written against TorchServe's handler contract.

Each request holds one or more images (the raw body, one multipart file each, or the elements of
an Open Inference Protocol BYTES input); each image's
answer is a list of 136 floats: 68 landmarks as (x, y) pairs. A request with several images
gets a list of such lists, in order. No numpy and no torchvision: PIL
decodes, torch resizes and normalises.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from ts.utils.util import PredictionException

SIZE = 224
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ResNetFacesHandler:
    def __init__(self) -> None:
        self.model: torch.jit.ScriptModule | None = None
        self.counts: list[int] = []

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        weights = context.manifest["model"]["serializedFile"]
        self.model = torch.jit.load(os.path.join(model_dir, weights), map_location="cpu")
        self.model.eval()

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """Every image of every request, stacked; `self.counts` remembers which is whose."""
        self.counts = []
        images = []
        for row in data:
            raws = [raw for value in row.values() for raw in _images(value)]
            if not raws:  # a PredictionException's message and code reach the client
                raise PredictionException(
                    "send images as the request body or as multipart files", 400
                )
            self.counts.append(len(raws))
            try:
                images.extend(_to_tensor(Image.open(io.BytesIO(raw))) for raw in raws)
            except UnidentifiedImageError:
                raise PredictionException(
                    "a request holds something that is not an image", 400
                ) from None
        return torch.stack(images)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        assert self.model is not None, "initialize() was not called"
        batch = self.preprocess(data)
        with torch.inference_mode():
            out = self.model(batch)
        rows = [[round(v, 5) for v in row] for row in out.tolist()]
        answers: list[Any] = []
        for count in self.counts:  # one image: 136 floats; several: a list of them
            mine, rows = rows[:count], rows[count:]
            answers.append(mine[0] if count == 1 else mine)
        return answers


def _images(value: Any) -> list[bytes | bytearray]:
    """The encoded images in one input: raw bytes, or (OIP BYTES) nested lists of them."""
    if isinstance(value, (bytes, bytearray)):
        return [value]
    if isinstance(value, list):
        return [raw for item in value for raw in _images(item)]
    return []


def _to_tensor(image: Image.Image) -> torch.Tensor:
    rgb = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    chw = pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).float().div_(255)
    return (chw - MEAN) / STD
