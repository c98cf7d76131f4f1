"""`image_classifier`: images in, top-5 classes out, with `index_to_name.json` when present.

Images are decoded with PIL and transformed in torch (resize the short side to 256, centre
crop 224, ImageNet normalisation), with no numpy or torchvision. Every image of a request (a
raw body, or each file of a multipart request) gets its own result: one image answers one
`{label: probability}` object, several answer a list of them in order.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch
from PIL import Image

from tsctl.worker.context import Context
from tsctl.worker.handlers.base import BaseHandler

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def image_tensor(raw: bytes | bytearray, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Decode and transform one image into a normalised 3 x crop x crop float tensor."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    width, height = image.size
    scale = resize / min(width, height)
    image = image.resize(
        (max(crop, round(width * scale)), max(crop, round(height * scale))),
        Image.Resampling.BILINEAR,
    )
    width, height = image.size
    left, top = (width - crop) // 2, (height - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = pixels.view(crop, crop, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (chw - mean) / std


def request_images(row: dict[str, Any]) -> list[bytes | bytearray]:
    """Every binary field of a request, in order: one per image."""
    images = [v for v in row.values() if isinstance(v, (bytes, bytearray))]
    if not images:
        raise ValueError("the request holds no image (send it as the body or a multipart file)")
    return images


class ImageClassifier(BaseHandler):
    topk = 5

    def __init__(self) -> None:
        super().__init__()
        self.mapping: dict[str, Any] = {}
        self._counts: list[int] = []

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        path = os.path.join(context.system_properties["model_dir"], "index_to_name.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                self.mapping = json.load(fh)

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        per_request = [request_images(row) for row in data]
        self._counts = [len(images) for images in per_request]
        tensors = [image_tensor(raw) for images in per_request for raw in images]
        return torch.stack(tensors).to(self.device)

    def _label(self, index: int) -> str:
        name = self.mapping.get(str(index), str(index))
        return str(name[-1]) if isinstance(name, list) else str(name)

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        probabilities = torch.softmax(data, dim=1)
        top = torch.topk(probabilities, min(self.topk, probabilities.shape[1]), dim=1)
        results = [
            {self._label(i): round(p, 6) for i, p in zip(idx, prob, strict=True)}
            for idx, prob in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
        grouped: list[Any] = []
        offset = 0
        for count in self._counts:
            chunk = results[offset : offset + count]
            grouped.append(chunk[0] if count == 1 else chunk)
            offset += count
        return grouped
