"""`ObjectDetector`: TorchServe's default object detection handler.

Each image becomes a float tensor in [0, 1] (no resizing: detection models do their own), and
the model is given the batch's images as a list of tensors, as torchvision's detection models
take them, so images of different sizes share a batch (TorchServe stacks them, which fails
unless they have one size). The model answers, per image, a dict of `boxes` (Kx4, x1 y1 x2
y2), `labels` (K) and `scores` (K), as torchvision's detection models do (a
TorchScript-compiled one answers a `(losses, detections)` pair; its detections are used).
Detections scoring at least `threshold` (0.5) are answered, per image, as a list of
`{label: [x1, y1, x2, y2], "score": s}`, labels from `index_to_name.json` when the archive
has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ts.handler_utils.timer import timed
from ts.torch_handler import _transforms as T
from ts.torch_handler.vision_handler import VisionHandler
from ts.utils.util import map_class_to_label


def detections_of(data: Any) -> Sequence[Any]:
    """The per-image detection dicts of a model's output."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], (list, tuple)):
        data = data[1]  # a scripted torchvision detector answers (losses, detections)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not all(isinstance(d, dict) for d in data):
        raise TypeError(
            "an object detection model must answer a list of dicts with boxes, labels and "
            f"scores (one per image), not {type(data).__name__}"
        )
    return data


class ObjectDetector(VisionHandler):
    """Images in, each image's detections above `threshold` out."""

    image_processing = T.Compose([T.ToRGB(), T.ToTensor()])
    threshold = 0.5
    stacked = False

    @timed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """The model on the list of image tensors (a stacked tensor is passed as it is)."""
        if isinstance(data, torch.Tensor):
            return super().inference(data, *args, **kwargs)
        with torch.inference_mode():
            return self.model([image.to(self.device) for image in data], *args, **kwargs)

    def postprocess(self, data: Any) -> list[list[dict[str, Any]]]:
        """Per image, each detection scoring >= `threshold` as `{label: box, "score": s}`."""
        result = []
        for row in detections_of(data):
            missing = {"boxes", "labels", "scores"} - set(row)
            if missing:
                raise KeyError(f"the model's detections lack {sorted(missing)}")
            keep = row["scores"] >= self.threshold
            boxes = row["boxes"][keep].tolist()
            labels = row["labels"][keep].tolist()
            scores = row["scores"][keep].tolist()
            found = []
            for label, box, score in zip(labels, boxes, scores, strict=True):
                detection = map_class_to_label([[box]], self.mapping, [[label]])[0]
                detection["score"] = score
                found.append(detection)
            result.append(found)
        return result
