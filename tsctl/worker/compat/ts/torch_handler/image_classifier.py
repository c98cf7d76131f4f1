"""`ImageClassifier`: TorchServe's default image classification handler.

Each image is converted to RGB, resized (shorter side 256), centre-cropped to 224x224 and
normalised with ImageNet's statistics; the model's logits are answered as the `topk` (5) most
probable classes, one `{label: probability}` object per image, most probable first, labels
from `index_to_name.json` when the archive has one. Subclasses may set `image_processing`
(a torchvision `Compose`, `ts.torch_handler._transforms`, or any callable) and `topk`.

Unlike TorchServe's, grayscale, palette and RGBA images work (they become RGB first), and a
model with fewer than `topk` classes is answered with all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from ts.handler_utils.timer import timed
from ts.torch_handler import _transforms as T
from ts.torch_handler.vision_handler import VisionHandler
from ts.utils.util import map_class_to_label


class ImageClassifier(VisionHandler):
    """Images in, the `topk` most probable labels of each out."""

    topk = 5
    image_processing = T.imagenet(resize=256, crop=224)

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    @timed
    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Softmax over the classes, then each row's top `topk` as `{label: probability}`."""
        probabilities = torch.softmax(data, dim=1)
        k = min(self.topk, probabilities.shape[1])
        probs, classes = torch.topk(probabilities, k, dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
