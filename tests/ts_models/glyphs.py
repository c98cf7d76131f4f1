"""Digit-like glyphs (0, 1 and 7) drawn with PIL: MNIST-style, white strokes on black.

Each glyph is drawn with a random offset, size and stroke width and a little pixel noise, so
a small net trained on some of them recognises fresh ones. Only PIL and `random`: the tests
and the build script (run in a subprocess) both import it.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

DIGITS = (0, 1, 7)


def draw_digit(digit: int, rng: random.Random, size: int = 28) -> Image.Image:
    """One grayscale ("L") `size`x`size` image of `digit`."""
    scale = size / 28
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    dx, dy = rng.randint(-2, 2) * scale, rng.randint(-2, 2) * scale
    width = max(1, round(rng.choice((2, 3)) * scale))
    grow = rng.uniform(-1.0, 1.0) * scale

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale + dx, y * scale + dy

    if digit == 0:
        left, top = at(8 - grow, 5 - grow)
        right, bottom = at(20 + grow, 23 + grow)
        draw.ellipse((left, top, right, bottom), outline=255, width=width)
    elif digit == 1:
        lean = rng.uniform(-1.5, 1.5)
        draw.line((*at(14 + lean, 5 - grow), *at(14 - lean, 23 + grow)), fill=255, width=width)
    elif digit == 7:
        draw.line((*at(8 - grow, 6), *at(20 + grow, 6)), fill=255, width=width)
        draw.line((*at(20 + grow, 6), *at(12, 23 + grow)), fill=255, width=width)
    else:
        raise ValueError(f"no glyph for digit {digit}")
    noisy = bytes(max(0, min(255, value + rng.randint(-20, 20))) for value in image.tobytes())
    return Image.frombytes("L", image.size, noisy)


def digit_set(seed: int, per_digit: int, size: int = 28) -> list[tuple[Image.Image, int]]:
    """`per_digit` images of each digit in `DIGITS`, shuffled, with their digits."""
    rng = random.Random(seed)
    samples = [(draw_digit(d, rng, size), d) for d in DIGITS for _ in range(per_digit)]
    rng.shuffle(samples)
    return samples
