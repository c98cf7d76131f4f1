"""The image transforms of tsctl's `ts.torch_handler._transforms` (torchvision's, without
torchvision), in this process through the `ts` fixture (tests/e2e/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from tests.support.ts_handlers import IMAGENET_MEAN, IMAGENET_STD, solid


def test_resize_sets_the_shorter_side_like_torchvision(ts: Any) -> None:
    resize = ts.T.Resize(256)
    assert resize(solid((1, 2, 3), (300, 200))).size == (384, 256)
    # the longer side is truncated, not rounded: 256 * 333 / 200 = 426.24, 256 * 199 / 150
    assert resize(solid((1, 2, 3), (333, 200))).size == (426, 256)
    assert resize(solid((1, 2, 3), (150, 199))).size == (256, 339)
    assert ts.T.Resize((28, 30))(solid((1, 2, 3), (90, 40))).size == (30, 28)
    same = solid((1, 2, 3), (256, 300))
    assert resize(same) is same


def test_resize_and_crop_accept_tensors(ts: Any) -> None:
    import torch

    image = torch.rand(3, 40, 60)
    assert tuple(ts.T.Resize(20)(image).shape) == (3, 20, 30)
    grid = torch.arange(25.0).view(1, 5, 5)
    assert ts.T.CenterCrop(3)(grid).tolist() == [[[6, 7, 8], [11, 12, 13], [16, 17, 18]]]
    padded = ts.T.CenterCrop((3, 4))(torch.ones(1, 1, 1))
    assert padded.tolist() == [[[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]]


def test_center_crop_takes_the_middle(ts: Any) -> None:
    image = Image.frombytes("L", (5, 4), bytes(range(20)))  # row-major: pixel (x, y) = 5y + x
    cropped = ts.T.CenterCrop((2, 3))(image)
    # top = round((4 - 2) / 2) = 1, left = round((5 - 3) / 2) = 1
    assert list(cropped.tobytes()) == [6, 7, 8, 11, 12, 13]
    odd = ts.T.CenterCrop(2)(Image.new("L", (5, 5)))
    assert odd.size == (2, 2)


def test_center_crop_pads_a_small_image_with_zeros_like_torchvision(ts: Any) -> None:
    image = Image.new("L", (1, 1), 9)
    cropped = ts.T.CenterCrop((3, 4))(image)  # pads (4-1)//2 = 1 left, (3-1)//2 = 1 on top
    assert list(cropped.tobytes()) == [0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0]


def test_to_tensor_scales_bytes_and_puts_channels_first(ts: Any) -> None:
    image = Image.frombytes("RGB", (2, 1), bytes([255, 0, 51, 102, 204, 0]))
    tensor = ts.T.ToTensor()(image)
    assert tuple(tensor.shape) == (3, 1, 2)
    flat = tensor.flatten().tolist()  # channel by channel: R of both pixels, then G, then B
    assert flat == pytest.approx([1.0, 0.4, 0.0, 0.8, 0.2, 0.0])
    gray = ts.T.ToTensor()(Image.new("L", (3, 2), 255))
    assert tuple(gray.shape) == (1, 2, 3) and gray.min().item() == 1.0
    assert ts.T.ToTensor()(Image.new("1", (2, 2), 1)).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]
    floats = ts.T.ToTensor()(Image.new("F", (1, 1), 3.5))
    assert floats.tolist() == [[[3.5]]]


def test_normalize_per_channel_and_names_a_mismatch(ts: Any) -> None:
    import torch

    tensor = torch.tensor([[[1.0]], [[0.5]]])
    assert ts.T.Normalize((0.5, 0.25), (0.5, 0.25))(tensor).tolist() == [[[1.0]], [[1.0]]]
    with pytest.raises(ValueError, match="3 means but the image has 1 channels"):
        ts.T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(torch.zeros(1, 2, 2))
    with pytest.raises(TypeError, match="use ToTensor first"):
        ts.T.Normalize((0.5,), (0.5,))(Image.new("L", (1, 1)))


def test_grayscale_torgb_and_compose(ts: Any) -> None:
    image = Image.new("RGB", (1, 1), (255, 0, 0))
    assert ts.T.Grayscale()(image).mode == "L"
    three = ts.T.Grayscale(num_output_channels=3)(image)
    assert three.mode == "RGB" and len(set(three.getpixel((0, 0)))) == 1
    assert ts.T.ToRGB()(Image.new("RGBA", (1, 1), (1, 2, 3, 4))).getpixel((0, 0)) == (1, 2, 3)
    pipeline = ts.T.Compose([ts.T.Grayscale(), ts.T.ToTensor()])
    assert tuple(pipeline(image).shape) == (1, 1, 1)


def test_imagenet_pipeline_on_a_solid_image(ts: Any) -> None:
    colour = (200, 100, 50)
    tensor = ts.T.imagenet()(solid(colour, (320, 240)))
    assert tuple(tensor.shape) == (3, 224, 224)
    for channel, value in enumerate(colour):
        expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert tensor[channel].min().item() == pytest.approx(expected, abs=1e-5)
        assert tensor[channel].max().item() == pytest.approx(expected, abs=1e-5)
