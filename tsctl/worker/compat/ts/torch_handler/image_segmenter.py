"""`ImageSegmenter`: TorchServe's default semantic segmentation handler.

Images are prepared as for the image classifier (RGB, shorter side 256, centre crop 224,
ImageNet normalisation). The model answers NxCxHxW class scores, under the key `out` as
torchvision's segmentation models do, or as a plain tensor. Each image is answered with its
most probable class per pixel and that class's probability: an HxWx2 nested list,
`[class, probability]` per pixel (the class as a float, as TorchServe sends it).
"""

from __future__ import annotations

from typing import Any

import torch

from ts.torch_handler import _transforms as T
from ts.torch_handler.vision_handler import VisionHandler


class ImageSegmenter(VisionHandler):
    """Images in, per pixel `[class, probability]` of the most probable class out."""

    image_processing = T.imagenet(resize=256, crop=224)

    def postprocess(self, data: Any) -> list[Any]:
        """Softmax over the classes; per pixel the best class and its probability."""
        scores = data["out"] if isinstance(data, dict) else data
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise ValueError(f"a segmentation model must answer NxCxHxW scores, not {shape}")
        best = torch.softmax(scores, dim=1).max(dim=1)
        pairs = torch.stack([best.indices.to(best.values.dtype), best.values], dim=3)
        answer: list[Any] = pairs.tolist()
        return answer
