"""A tiny MNIST-style classifier: 1x28x28 grayscale in, 10 digit logits out (eager model)."""

import torch
from torch import nn


class DigitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 12 * 12, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out
