"""Image transforms with torchvision's names and results, made of PIL and plain torch ops.

TorchServe's vision handlers build their `image_processing` from `torchvision.transforms`;
torchvision is not a tsctl dependency (nor is numpy), so the built-in handlers use these
instead. For a PIL image each one computes what the torchvision transform of the same name
computes (same output sizes, the same PIL resampling, the same crop offsets), so a model
served by tsctl sees the tensors it saw under TorchServe. A handler that sets its own
`image_processing` from torchvision still works unchanged when torchvision is installed; one
that cannot rely on torchvision can use these:

    from ts.torch_handler import _transforms as T
    image_processing = T.Compose([T.Grayscale(), T.ToTensor(), T.Normalize((0.13,), (0.31,))])

`ToRGB` is the one transform torchvision lacks: the built-in handlers put it first so that
grayscale, palette and RGBA images become 3-channel RGB (TorchServe fails on them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

#: the statistics ImageNet models are trained with (and TorchServe's handlers normalise by)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: PIL modes whose pixels are not 8-bit: their torch dtype (and no scaling to [0, 1])
_WIDE_MODES = {"I": torch.int32, "I;16": torch.int16, "F": torch.float32}


class Compose:
    """Apply each transform in turn (torchvision's `Compose`)."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Any:
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int] | int:
    """An int, or an `(height, width)` pair (a 1-sequence counts as an int)."""
    if isinstance(size, int):
        return size
    values = tuple(size)
    if len(values) == 1:
        return int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise ValueError(f"{name} size must be an int or (height, width), not {size!r}")


def _image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """`(height, width)` of a PIL image or a `...xHxW` tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    width, height = image.size
    return height, width


def _check_image(image: Any, name: str) -> None:
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"{name} needs a PIL image or a tensor, not {type(image).__name__}")


class Resize:
    """Resize to `size`: an int sets the shorter side (the longer keeps the aspect ratio,
    truncated as torchvision does); `(height, width)` sets both. PIL images are resampled by
    PIL (bilinear by default, as torchvision does for PIL input); tensors by
    `torch.nn.functional.interpolate` with antialiasing."""

    def __init__(
        self,
        size: int | Sequence[int],
        interpolation: Image.Resampling = Image.Resampling.BILINEAR,
    ) -> None:
        self.size = _pair(size, "Resize")
        self.interpolation = interpolation

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The `(height, width)` an image of this size is resized to."""
        if not isinstance(self.size, int):
            return self.size
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _check_image(image, "Resize")
        height, width = _image_size(image)
        new_height, new_width = self.output_size(height, width)
        if (new_height, new_width) == (height, width):
            return image
        if isinstance(image, Image.Image):
            return image.resize((new_width, new_height), self.interpolation)
        batched = image if image.dim() == 4 else image.unsqueeze(0)
        mode = "nearest" if self.interpolation == Image.Resampling.NEAREST else "bilinear"
        out = torch.nn.functional.interpolate(
            batched.float(),
            size=(new_height, new_width),
            mode=mode,
            align_corners=None if mode == "nearest" else False,
            antialias=mode != "nearest",
        )
        return out if image.dim() == 4 else out.squeeze(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _crop_start(size: int, crop: int) -> int:
    """Where a centre crop starts; negative when the crop is larger (zero padding), split
    the way torchvision pads (the smaller half before)."""
    if crop > size:
        return -((crop - size) // 2)
    return round((size - crop) / 2.0)


class CenterCrop:
    """Cut the centre `size` (int: a square) out of the image; an image smaller than the crop
    is padded with zeros around it, as torchvision does."""

    def __init__(self, size: int | Sequence[int]) -> None:
        pair = _pair(size, "CenterCrop")
        self.size = (pair, pair) if isinstance(pair, int) else pair

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _check_image(image, "CenterCrop")
        height, width = _image_size(image)
        crop_h, crop_w = self.size
        top, left = _crop_start(height, crop_h), _crop_start(width, crop_w)
        if isinstance(image, Image.Image):
            # PIL fills the part of the box outside the image with zeros
            return image.crop((left, top, left + crop_w, top + crop_h))
        if top < 0 or left < 0:
            pad_top, pad_left = max(-top, 0), max(-left, 0)
            pad_bottom = max(crop_h - height - pad_top, 0)
            pad_right = max(crop_w - width - pad_left, 0)
            image = torch.nn.functional.pad(image, (pad_left, pad_right, pad_top, pad_bottom))
            top, left = max(top, 0), max(left, 0)
        return image[..., top : top + crop_h, left : left + crop_w]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class ToTensor:
    """A PIL image as a `CxHxW` tensor: 8-bit modes become float32 in [0, 1] (mode "1"
    gives 0 and 1); "I", "I;16" and "F" keep their values, as torchvision's `ToTensor`."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToTensor needs a PIL image, not {type(image).__name__}")
        if image.mode == "1":
            image = image.convert("L")
        width, height = image.size
        dtype = _WIDE_MODES.get(image.mode, torch.uint8)
        raw = bytearray(image.tobytes())
        if not raw:
            return torch.zeros((len(image.getbands()), height, width))
        pixels = torch.frombuffer(raw, dtype=dtype)
        chw = pixels.view(height, width, -1).permute(2, 0, 1).contiguous()
        return chw.float().div_(255) if dtype == torch.uint8 else chw

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """`(x - mean) / std` per channel of a float `CxHxW` (or `NxCxHxW`) tensor; a new tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean {list(mean)} and std {list(std)} differ in length")
        if any(s == 0 for s in std):
            raise ValueError(f"Normalize: std {list(std)} holds a zero")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"Normalize needs a float tensor (use ToTensor first), not {kind}")
        channels = tensor.shape[-3] if tensor.dim() >= 3 else 0
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f"Normalize has {len(self.mean)} means but the image has {channels} channels "
                f"(shape {tuple(tensor.shape)})"
            )
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return (tensor - mean) / std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"


class Grayscale:
    """A PIL image as grayscale (PIL's "L" conversion), with 1 or 3 identical channels."""

    def __init__(self, num_output_channels: int = 1) -> None:
        if num_output_channels not in (1, 3):
            raise ValueError(
                f"Grayscale: num_output_channels must be 1 or 3, not {num_output_channels}"
            )
        self.num_output_channels = num_output_channels

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Grayscale needs a PIL image, not {type(image).__name__}")
        gray = image.convert("L")
        return gray if self.num_output_channels == 1 else Image.merge("RGB", (gray, gray, gray))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_output_channels={self.num_output_channels})"


class ToRGB:
    """A PIL image in RGB mode whatever its mode (grayscale, palette, RGBA, CMYK...)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToRGB needs a PIL image, not {type(image).__name__}")
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def imagenet(resize: int = 256, crop: int = 224) -> Compose:
    """The pipeline TorchServe's image classifier and segmenter use, RGB conversion first."""
    return Compose(
        [
            ToRGB(),
            Resize(resize),
            CenterCrop(crop),
            ToTensor(),
            Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
