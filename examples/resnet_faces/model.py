"""ResNet-18-shaped face-landmark regressor in plain PyTorch (no torchvision).

Input: float tensor ``[N, 3, 224, 224]``, RGB, normalised with the ImageNet
mean/std below. Output: ``[N, 136]``, i.e. 68 landmarks as interleaved
``(x, y)`` pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_SIZE: int = 224
NUM_LANDMARKS: int = 68


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    expansion: int = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block."""
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNetFaces(nn.Module):
    """ResNet-18 backbone with a ``Linear(512, 136)`` landmark head."""

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_landmarks: int = NUM_LANDMARKS,
    ) -> None:
        super().__init__()
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_landmarks * 2)
        self._init_weights()

    def _make_layer(self, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        """Stack ``blocks`` BasicBlocks; the first one may downsample."""
        mods: list[nn.Module] = [BasicBlock(self.in_ch, out_ch, stride)]
        self.in_ch = out_ch
        mods.extend(BasicBlock(out_ch, out_ch) for _ in range(1, blocks))
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        """Kaiming init for convs, unit/zero for BN, small normal for the head."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, 3, H, W]`` images to ``[N, 136]`` landmark coordinates."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        landmarks: Tensor = self.fc(x)
        return landmarks
