"""An object detector with torchvision's output format, for the built-in object_detector.

It "detects" solid red, green and blue rectangles: per image, one box per colour present
(x1, y1, x2, y2, end exclusive), labelled 1, 2, 3, scored by the `confidence` parameter the
archive's state_dict sets.
"""

import torch
from torch import nn


class ColourDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.confidence = nn.Parameter(torch.zeros(3))

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        found = []
        for image in images:
            boxes, labels, scores = [], [], []
            for channel in range(3):
                others = [image[c] for c in range(3) if c != channel]
                mask = (image[channel] > 0.6) & (others[0] < 0.4) & (others[1] < 0.4)
                ys, xs = torch.nonzero(mask, as_tuple=True)
                if len(xs):
                    box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    boxes.append(box.float())
                    labels.append(channel + 1)
                    scores.append(self.confidence[channel])
            found.append(
                {
                    "boxes": torch.stack(boxes) if boxes else torch.zeros((0, 4)),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.stack(scores) if scores else torch.zeros(0),
                }
            )
        return found
