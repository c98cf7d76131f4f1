"""Generate a few small synthetic face-like JPEGs for smoke-testing the server.

Writes ``face_a.jpg``, ``face_b.jpg`` and ``face_c.jpg`` (224x224, a few KB
each) into ``--out-dir`` (default: ``images/`` next to this script).
Output is deterministic (fixed seed, fixed JPEG settings).

Usage: ``python make_images.py [--out-dir DIR]``
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = HERE / "images"
SIZE = 224
SEED = 0
NAMES = ("face_a", "face_b", "face_c")


def _rgb(rng: random.Random, lo: int, hi: int) -> tuple[int, int, int]:
    """Random RGB colour with each channel in ``[lo, hi]``."""
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def draw_face(rng: random.Random, size: int = SIZE) -> Image.Image:
    """Draw one face: background, ellipse head, two eyes, nose and mouth."""
    img = Image.new("RGB", (size, size), _rgb(rng, 40, 200))
    d = ImageDraw.Draw(img)
    cx = size // 2 + rng.randint(-12, 12)
    cy = size // 2 + rng.randint(-12, 12)
    rx, ry = rng.randint(55, 75), rng.randint(75, 95)
    skin = (rng.randint(170, 240), rng.randint(120, 190), rng.randint(90, 150))
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin, outline=(60, 40, 30), width=2)
    ey, ex, er = cy - ry // 4, rx // 2, rng.randint(6, 10)
    for sx in (cx - ex, cx + ex):
        d.ellipse((sx - er * 2, ey - er, sx + er * 2, ey + er), fill=(250, 250, 250))
        d.ellipse((sx - er, ey - er, sx + er, ey + er), fill=_rgb(rng, 20, 90))
        d.line((sx - er * 2, ey - er * 2, sx + er * 2, ey - er * 2 - 3), fill=(50, 30, 20), width=3)
    d.polygon([(cx, cy - 5), (cx - 8, cy + 18), (cx + 8, cy + 18)], outline=(120, 70, 50))
    my, mw = cy + ry // 2, rx // 2
    d.arc((cx - mw, my - 15, cx + mw, my + 10), 20, 160, fill=(150, 30, 40), width=4)
    return img


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder")
    args = parser.parse_args(argv)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    for name in NAMES:
        path = out_dir / f"{name}.jpg"
        draw_face(rng).save(path, format="JPEG", quality=85, optimize=False)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
