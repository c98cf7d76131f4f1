"""Builders and helpers for the tests of TorchServe's default handlers as tsctl implements them
(tsctl/worker/compat/ts/torch_handler): archives of tests/fixtures/ts_models, images, request
bodies, and handlers set up in the test process.

The `ts` and `built` fixtures that go with them are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

import tsctl
from tests.support.cli import BIN
from tests.support.daemon import Response
from tests.support.paths import FIXTURES
from tsctl.worker.envelope import EnvelopeInputError

COMPAT = Path(tsctl.__file__).resolve().parent / "worker" / "compat"
TS_MODELS = FIXTURES / "ts_models"
COLOURS = ["red", "green", "blue", "yellow", "cyan", "dark"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: TorchScript models (what TorchServe users archive) load with torch.jit.load, which warns
JIT_LOAD_DEPRECATED = "ignore:`torch.jit.load` is deprecated:DeprecationWarning"
#: the modules build.py's eager models are imported as (from a model directory)
MODEL_MODULES = ("colour_detector", "text_model", "mnist_net", "mnist_handler")


# -- archives -------------------------------------------------------------------------------


def archive(store: Path, name: str, *args: str | Path) -> None:
    """Archive with the reference torch-model-archiver 0.12."""
    exe = BIN / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency: run `make test`"
    command = [exe, "--model-name", name, "--version", "1.0", "--export-path", store, *args]
    made = subprocess.run(list(map(str, command)), capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stdout + made.stderr


def build_archives(store: Path, built: Path) -> None:
    """The default-handler archives from tests/fixtures/ts_models/build.py's output `built`,
    made by the real torch-model-archiver (tests/e2e/test_ts_handlers.py serves them on tsctl,
    test_torchserve_parity.py on TorchServe too)."""
    archive(
        store, "colours", "--serialized-file", built / "classifier.pt",
        "--handler", "image_classifier",
        "--extra-files", built / "classifier" / "index_to_name.json",
    )  # fmt: skip
    archive(
        store, "detector", "--model-file", TS_MODELS / "colour_detector.py",
        "--serialized-file", built / "detector_state.pt", "--handler", "object_detector",
        "--extra-files", built / "detector" / "index_to_name.json",
    )  # fmt: skip
    archive(
        store, "segmenter", "--serialized-file", built / "segmenter.pt",
        "--handler", "image_segmenter",
    )  # fmt: skip
    text = built / "text"
    archive(
        store, "sentiment", "--model-file", TS_MODELS / "text_model.py",
        "--serialized-file", built / "text_state.pt", "--handler", "text_classifier",
        "--extra-files", f"{text / 'index_to_name.json'},{text / 'source_vocab.pt'}",
    )  # fmt: skip
    archive(
        store, "digits", "--model-file", TS_MODELS / "mnist_net.py",
        "--serialized-file", built / "mnist_state.pt",
        "--handler", TS_MODELS / "mnist_handler.py",
    )  # fmt: skip


# -- images and bodies ----------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (300, 200)) -> Image.Image:
    return Image.new("RGB", size, colour)


def boxes_image() -> Image.Image:
    """Black 80x60 with a red box [10, 5, 30, 25], green [40, 30, 70, 50], blue [50, 2, 70, 20]."""
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 5, 29, 24), fill=(255, 0, 0))
    draw.rectangle((40, 30, 69, 49), fill=(0, 255, 0))
    draw.rectangle((50, 2, 69, 19), fill=(0, 0, 255))
    return image


def multipart(*parts: tuple[str, bytes, str]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of `(name, data, content type)` file parts."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, data, content_type in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"'
            f"\r\nContent-Type: {content_type}\r\n\r\n".encode()
        )
        chunks += [data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (a decompression bomb's header:
    PIL refuses it on opening, before any pixel is decoded)."""
    png = bytearray(encode(Image.new("RGB", (1, 1))))
    png[16:24] = struct.pack(">II", width, height)  # IHDR's data follows its length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


# -- answers --------------------------------------------------------------------------------


def ok(response: Response) -> Any:
    assert response.status == 200, (response.status, response.body[:500])
    return response.json()


def bad_request(response: Response) -> str:
    """The message of a 400 answer."""
    assert response.status == 400, (response.status, response.body[:500])
    doc = response.json()
    assert doc["code"] == 400, doc
    message: str = doc["message"]
    return message


def plain(answers: list[Any]) -> list[Any]:
    """Answers with each per-request error as `("error", message)`, to compare lists."""
    return [("error", a.message) if isinstance(a, EnvelopeInputError) else a for a in answers]


def first(answer: dict[str, Any]) -> str:
    """The first (most probable) label of a `{label: probability}` answer."""
    return next(iter(answer))


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol


# -- handlers in the test process -----------------------------------------------------------


def context_for(model_dir: Path, model: dict[str, str], **settings: Any) -> Any:
    from tsctl.worker.context import Context, RequestProcessor

    context = Context(
        model_name="m",
        model_dir=str(model_dir),
        manifest={"model": model},
        batch_size=1,
        gpu=None,
        server_version="test",
        **settings,
    )
    context.request_processor = [RequestProcessor({})]
    return context


def initialized(
    handler: Any, model_dir: Path, model: dict[str, str], *files: Path, **settings: Any
) -> Any:
    """`handler` initialized in this process on a model directory holding `files`."""
    model_dir.mkdir(exist_ok=True)
    for path in files:
        shutil.copy(path, model_dir / path.name)
    handler.initialize(context_for(model_dir, model, **settings))
    return handler


def bare(cls: Any) -> Any:
    """A handler instance that has not loaded a model (for preprocess/postprocess)."""
    import torch

    handler = cls()
    handler.device = torch.device("cpu")
    return handler


def handle(handler: Any, rows: list[Any], headers: dict[str, str] | None = None) -> Any:
    """`handler.handle` on a batch of `rows`, each request with `headers`."""
    from tsctl.worker.context import RequestProcessor

    context = handler.context
    context.request_processor = [RequestProcessor(headers or {}) for _ in rows]
    return handler.handle(rows, context)
