"""TorchServe's default handlers as tsctl implements them (tsctl/worker/compat/ts/torch_handler).

Unit tests import tsctl's `ts` package into this process through the `ts` fixture, which puts
tsctl/worker/compat first on `sys.path` and puts `sys.path` and `sys.modules` back afterwards
(the real TorchServe `ts` is installed in the dev venv too). End-to-end tests archive small
models with the real torch-model-archiver 0.12, naming the built-in handlers as TorchServe
users do (`--handler image_classifier`), plus a custom `ImageClassifier` subclass serving a
digit net trained on generated glyphs, and serve them all from one tsctl daemon. One more
archive, `held` (the ObjectDetector with a hook that keeps its worker busy, batch size 4),
lets a test queue four requests and have them run as one real batch.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
import types
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image, ImageDraw

import tsctl
from tests.fixtures.ts_models.glyphs import digit_set
from tests.support.cli import BIN
from tests.support.daemon import Response, Server
from tests.support.paths import FIXTURES
from tests.support.torchserve import venv_from_environment
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
#: requests the `held` model runs as one batch
HELD_BATCH = 4


# -- fixtures -------------------------------------------------------------------------------


def _is_ts(name: str) -> bool:
    return name == "ts" or name.startswith("ts.")


@pytest.fixture(scope="module")
def ts() -> Iterator[Any]:
    """tsctl's `ts` modules, imported in this process; sys.path and sys.modules restored."""
    saved_path = list(sys.path)
    displaced = {name: module for name, module in sys.modules.items() if _is_ts(name)}
    for name in displaced:
        del sys.modules[name]
    sys.path.insert(0, str(COMPAT))
    try:
        yield SimpleNamespace(
            T=importlib.import_module("ts.torch_handler._transforms"),
            vision=importlib.import_module("ts.torch_handler.vision_handler"),
            classifier=importlib.import_module("ts.torch_handler.image_classifier"),
            detector=importlib.import_module("ts.torch_handler.object_detector"),
            segmenter=importlib.import_module("ts.torch_handler.image_segmenter"),
            text=importlib.import_module("ts.torch_handler.text_handler"),
            text_classifier=importlib.import_module("ts.torch_handler.text_classifier"),
            util=importlib.import_module("ts.utils.util"),
            per_request=importlib.import_module("ts.torch_handler._per_request"),
            micro=importlib.import_module("ts.handler_utils.micro_batching"),
        )
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if _is_ts(n) or n in MODEL_MODULES]:
            del sys.modules[name]
        sys.modules.update(displaced)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models of tests/fixtures/ts_models/build.py (run in a subprocess: it imports torch)."""
    out = tmp_path_factory.mktemp("ts_models")
    subprocess.run([sys.executable, str(TS_MODELS / "build.py"), str(out)], check=True)
    return out


def archive(store: Path, name: str, *args: str | Path) -> None:
    """Archive with the reference torch-model-archiver 0.12."""
    exe = BIN / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency: run `make test`"
    command = [exe, "--model-name", name, "--version", "1.0", "--export-path", store, *args]
    made = subprocess.run(list(map(str, command)), capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stdout + made.stderr


def build_archives(store: Path, built: Path) -> None:
    """The default-handler archives of this module from tests/fixtures/ts_models/build.py's output
    `built`, made by the real torch-model-archiver (test_torchserve_parity.py serves the same
    ones on TorchServe)."""
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


@pytest.fixture(scope="module")
def served(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("ts_handlers"))
    store = srv.store
    store.mkdir()
    build_archives(store, built)
    held_config = tmp_path_factory.mktemp("held") / "held.yaml"
    held_config.write_text(f"batchSize: {HELD_BATCH}\nmaxBatchDelay: 10000\n")
    archive(
        store, "held", "--model-file", TS_MODELS / "colour_detector.py",
        "--serialized-file", built / "detector_state.pt",
        "--handler", TS_MODELS / "held_detector.py", "--config-file", held_config,
        "--extra-files", built / "detector" / "index_to_name.json",
    )  # fmt: skip
    srv.start(
        "colours.mar", "detector.mar", "segmenter.mar", "sentiment.mar", "digits.mar", "held.mar"
    )
    yield srv
    srv.stop()


# -- helpers --------------------------------------------------------------------------------


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


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (a decompression bomb's header:
    PIL refuses it on opening, before any pixel is decoded)."""
    png = bytearray(encode(Image.new("RGB", (1, 1))))
    png[16:24] = struct.pack(">II", width, height)  # IHDR's data follows its length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def plain(answers: list[Any]) -> list[Any]:
    """Answers with each per-request error as `("error", message)`, to compare lists."""
    return [("error", a.message) if isinstance(a, EnvelopeInputError) else a for a in answers]


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


def first(answer: dict[str, Any]) -> str:
    """The first (most probable) label of a `{label: probability}` answer."""
    return next(iter(answer))


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol


# -- transforms -----------------------------------------------------------------------------


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


# -- handlers in-process --------------------------------------------------------------------


def bare(cls: Any) -> Any:
    """A handler instance that has not loaded a model (for preprocess/postprocess)."""
    import torch

    handler = cls()
    handler.device = torch.device("cpu")
    return handler


def test_vision_preprocess_reads_bytes_base64_and_lists(ts: Any) -> None:
    handler = bare(ts.classifier.ImageClassifier)
    png = encode(solid((255, 0, 0)))
    rows = [
        {"data": png},
        {"body": bytearray(encode(solid((255, 0, 0)), "JPEG"))},
        {"body": base64.b64encode(png).decode()},
        {"body": [[[0.5] * 224] * 224] * 3},
        {"data": encode(Image.new("LA", (50, 60)))},  # grayscale + alpha becomes RGB
    ]
    prepared = handler.preprocess(rows)
    assert isinstance(prepared, ts.per_request.Carried)
    batch = prepared.value
    assert tuple(batch.shape) == (5, 3, 224, 224)
    assert batch[0].equal(batch[2])
    assert batch[3].max().item() == 0.5
    assert prepared.layout.entries == (1, 1, 1, 1, 1) and prepared.layout.plain


def test_vision_preprocess_answers_each_unreadable_request_alone(
    ts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request that cannot be read becomes its own error; the others are batched."""
    handler = bare(ts.classifier.ImageClassifier)
    image = encode(solid((1, 1, 1), (10, 10)))
    # PIL fails past twice the limit (and warns past it): the 224x224 crop stays below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60000)  # restored after the test
    prepared = handler.preprocess(
        [
            {"data": image},
            {"note": "x"},
            {"body": b"hello"},
            {"data": encode(solid((1, 1, 1), (400, 400)))},  # 160000 pixels > 2 x 60000
            {"body": "%%%"},
            {"body": [[1.0, 2.0]]},  # a tensor of another shape than the batch's images
            {"body": {"not": "an image"}},
        ]
    )
    monkeypatch.undo()
    assert tuple(prepared.value.shape) == (1, 3, 224, 224)
    ok_entry, *errors = prepared.layout.entries
    assert ok_entry == 1 and all(isinstance(e, EnvelopeInputError) for e in errors)
    messages = [e.message for e in errors]
    assert "the request holds no image" in messages[0] and "'note'" in messages[0]
    assert "5 bytes that PIL cannot read as an image" in messages[1]
    assert "decompression-bomb limit of 120000 pixels" in messages[2]
    assert "limit_max_image_pixels=false" in messages[2]
    assert "PIL cannot read" in messages[3]  # "%%%" is no base64: decoded to nothing
    assert "shape (1, 2)" in messages[4] and "(3, 224, 224)" in messages[4]
    assert "not dict" in messages[5]


def test_vision_preprocess_several_images_of_one_request(ts: Any) -> None:
    handler = bare(ts.classifier.ImageClassifier)
    red, blue = encode(solid((250, 0, 0))), encode(solid((0, 0, 250)))
    prepared = handler.preprocess([{"a.png": red, "b.png": blue}, {"data": red}])
    assert prepared.layout.entries == (2, 1) and len(prepared.value) == 3
    broken = handler.preprocess([{"a.png": red, "b.png": b"junk"}])
    [error] = broken.layout.entries
    assert isinstance(error, EnvelopeInputError)
    assert error.message.startswith("image 2 of the request: 4 bytes that PIL cannot read")


def test_layout_places_answers_at_their_requests(ts: Any) -> None:
    layout_of = ts.per_request.gather
    error = EnvelopeInputError("no")
    _, layout = layout_of([["a"], error, ["b", "c"], ["d"]])
    assert layout.inputs == 4 and not layout.plain
    assert layout.place(["A", "B", "C", "D"]) == ["A", error, ["B", "C"], "D"]
    with pytest.raises(ValueError, match="3 answers for the batch's 4 model inputs"):
        layout.place(["A", "B", "C"])
    with pytest.raises(TypeError, match="postprocess returned dict"):
        layout.place({"A": 1})
    _, simple = layout_of([["a"], ["b"]])
    answers = {"any": "thing"}  # one input per request: answers pass as they are
    assert simple.plain and simple.place(answers) is answers


def test_request_value_reads_data_then_body(ts: Any) -> None:
    value = ts.per_request.request_value
    assert value({"data": b"a", "body": b"b"}) == b"a"
    assert value({"data": None, "body": "x"}) == "x"
    assert value({"body": 0}) == 0  # a falsy JSON body is still the input
    assert value({"other": 1}) is None
    assert value("raw") == "raw"


def test_image_classifier_postprocess_topk_and_mapping(ts: Any) -> None:
    import torch

    handler = bare(ts.classifier.ImageClassifier)
    logits = torch.tensor(
        [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]
    )
    rows = handler.postprocess(logits)
    assert len(rows) == 2
    assert list(rows[0]) == ["6", "5", "4", "3", "2"]
    probabilities = torch.softmax(logits, dim=1)
    assert rows[0]["6"] == pytest.approx(probabilities[0, 6].item())
    assert list(rows[1]) == ["0", "1", "2", "3", "4"]
    handler.set_max_result_classes(2)
    assert handler.get_max_result_classes() == 2
    handler.mapping = {str(i): f"c{i}" for i in range(7)}
    assert list(handler.postprocess(logits)[1]) == ["c0", "c1"]
    handler.set_max_result_classes(10)  # more than the model has: all classes
    assert len(handler.postprocess(logits)[0]) == 7


def test_object_detector_postprocess_threshold_and_labels(ts: Any) -> None:
    import torch

    handler = bare(ts.detector.ObjectDetector)
    detections = [
        {
            "boxes": torch.tensor(
                [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 1.0, 1.0]]
            ),
            "labels": torch.tensor([3, 1, 2]),
            "scores": torch.tensor([0.5, 0.9, 0.49]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)},
    ]
    assert handler.postprocess(detections) == [
        [
            {"3": [1.0, 2.0, 3.0, 4.0], "score": 0.5},
            {"1": [5.0, 6.0, 7.0, 8.0], "score": pytest.approx(0.9)},
        ],
        [],
    ]
    handler.mapping = {"1": "cat", "2": "dog", "3": "bird"}
    scripted = ({}, detections[:1])  # a scripted torchvision detector's (losses, detections)
    answer = handler.postprocess(scripted)
    assert [first(d) for d in answer[0]] == ["bird", "cat"]
    with pytest.raises(TypeError, match="list of dicts"):
        handler.postprocess(torch.zeros(2, 4))


def test_image_segmenter_postprocess_gives_class_and_probability_per_pixel(ts: Any) -> None:
    import torch

    handler = bare(ts.segmenter.ImageSegmenter)
    scores = torch.zeros(2, 3, 4, 5)
    scores[:, 2, 0, 0] = 10.0
    for output in ({"out": scores, "aux": scores}, scores):
        answer = handler.postprocess(output)
        assert len(answer) == 2 and len(answer[0]) == 4 and len(answer[0][0]) == 5
        assert answer[0][0][0][0] == 2.0 and answer[0][0][0][1] > 0.99
        assert answer[1][3][4] == [0.0, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="NxCxHxW"):
        handler.postprocess({"out": torch.zeros(3, 4)})


def test_text_cleanup_steps(ts: Any) -> None:
    handler = bare(ts.text_classifier.TextClassifier)
    text = "<p>I don't LIKE caf\u00e9 &amp; they'd've said it's Bob's, y'all!</p>"
    assert handler.clean(text) == [
        "i", "do", "not", "like", "cafe", "they", "would", "have", "said", "it", "is", "bobs",
        "you", "all",
    ]  # fmt: skip
    assert handler._expand_contractions("Won't you? I'm sure we'll") == (
        "Will not you? I am sure we will"
    )
    assert list(ts.text.ngrams_iterator(["a", "b", "c"], 2)) == ["a", "b", "c", "a b", "b c"]
    assert ts.text.basic_english("Hello, World! (it's)") == [
        "hello", ",", "world", "!", "(", "it", "'", "s", ")",
    ]  # fmt: skip


def test_contractions_expand_as_torchserve_does(ts: Any) -> None:
    handler = bare(ts.text_classifier.TextClassifier)
    expected = {
        "how'd": "how did",
        "where'd": "where did",
        "so's": "so as",
        "why's": "why is",
        "can't": "cannot",
        "i'm": "i am",
        "it'd": "it would",
        "who's": "who is",
        "let's": "let us",
        "o'clock": "of the clock",
        "they'd've": "they would have",
        "y'all'd've": "you all would have",
        # not in the table: the apostrophe goes, as in TorchServe
        "here's": "heres",
        "who'd": "whod",
        "bob's": "bobs",
    }
    for word, expansion in expected.items():
        assert handler._expand_contractions(word) == expansion, word
    assert handler.clean("How'd you know? So's to see, why's that") == [
        "how", "did", "you", "know", "so", "as", "to", "see", "why", "is", "that",
    ]  # fmt: skip


@pytest.mark.slow
def test_contractions_match_torchserves_own_expansions(ts: Any, tmp_path: Path) -> None:
    """Every contraction TorchServe 0.12's table lists, through TorchServe's own
    `_expand_contractions` (run in its venv) and through ours."""
    python = venv_from_environment() / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no TorchServe venv at {python.parent.parent}")
    script = (
        "import json\n"
        "from ts.torch_handler.contractions import CONTRACTION_MAP\n"
        "from ts.torch_handler.text_handler import TextHandler\n"
        "words = [w.lower() for w in CONTRACTION_MAP]\n"
        "print(json.dumps({w: TextHandler._expand_contractions(None, w) for w in words}))\n"
    )
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(theirs) > 100
    handler = bare(ts.text_classifier.TextClassifier)
    # where TorchServe garbles its own table: it copies the contraction's first character
    # onto the expansion ("ain't" -> "as not"), and of a double contraction it expands the
    # first part only ("they'd've" -> "they wouldve")
    garbled = {"ain't": "is not", "'cause": "because"}
    for word, expansion in theirs.items():
        ours = handler._expand_contractions(word)
        if word in garbled:
            assert ours == garbled[word], word
        elif word.count("'") > 1 and word != "sha'n't":
            assert " " in ours and "'" not in ours, (word, ours)
        else:
            assert ours == expansion, word


def test_cleanup_honours_both_punctuation_hook_names(ts: Any) -> None:
    """TorchServe's own name is misspelt (`_remove_puncutation`); either override counts."""

    class Misspelt(ts.text_classifier.TextClassifier):
        def _remove_puncutation(self, text: str) -> str:
            return text.replace("!", " bang ")

    class Spelt(ts.text_classifier.TextClassifier):
        def _remove_punctuation(self, text: str) -> str:
            return text.replace("!", " bang ")

    for cls in (Misspelt, Spelt):
        assert bare(cls).clean("wow!") == ["wow", "bang"], cls.__name__
    assert bare(ts.text_classifier.TextClassifier).clean("wow!") == ["wow"]


def test_vocabulary_forms(ts: Any, tmp_path: Path) -> None:
    import torch

    tokens = ["<unk>", "good", "bad"]
    (tmp_path / "list.json").write_text(json.dumps(tokens))
    (tmp_path / "dict.json").write_text(json.dumps({"good": 4, "bad": 7}))
    torch.save({t: i for i, t in enumerate(tokens)}, tmp_path / "dict.pt")
    torch.save(tokens, tmp_path / "list.pt")
    for name in ("list.json", "dict.pt", "list.pt"):
        vocab = ts.text.load_vocab(str(tmp_path / name))
        assert vocab["bad"] == 2 and vocab["unseen"] == 0 and len(vocab) == 3
    strict = ts.text.load_vocab(str(tmp_path / "dict.json"))
    assert strict["bad"] == 7 and strict.get("unseen") is None
    with pytest.raises(KeyError, match="has no <unk>"):
        strict["unseen"]
    (tmp_path / "bad.json").write_text(json.dumps({"good": "x"}))
    with pytest.raises(ValueError, match=r"bad\.json holds a dict, not a vocabulary"):
        ts.text.load_vocab(str(tmp_path / "bad.json"))


def test_a_torchtext_vocabulary_is_refused_clearly(
    ts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchServe's archives pickle a torchtext Vocab; without torchtext it cannot load."""
    import torch

    vocab_module = types.ModuleType("torchtext.vocab")
    vocab_class = type("Vocab", (), {"__module__": "torchtext.vocab"})
    vocab_module.Vocab = vocab_class  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchtext", types.ModuleType("torchtext"))
    monkeypatch.setitem(sys.modules, "torchtext.vocab", vocab_module)
    torch.save(vocab_class(), tmp_path / "source_vocab.pt")
    monkeypatch.undo()  # torchtext is gone again, as in a worker
    with pytest.raises(ValueError, match="needs torchtext to load") as info:
        ts.text.load_vocab(str(tmp_path / "source_vocab.pt"))
    assert "source_vocab.pt" in str(info.value) and "get_stoi()" in str(info.value)


def _handle(handler: Any, rows: list[Any], headers: dict[str, str] | None = None) -> Any:
    from tsctl.worker.context import RequestProcessor

    context = handler.context
    context.request_processor = [RequestProcessor(headers or {}) for _ in rows]
    return handler.handle(rows, context)


@pytest.mark.slow
def test_text_classifier_classifies_a_batch_in_one_call(sentiment: Any) -> None:
    handler = sentiment
    texts = ["what a GREAT film", "boring, awful", "nothing known here"]
    prepared = handler.preprocess([{"body": t.encode()} for t in texts])
    assert prepared.value.offsets.tolist() == [0, 7, 10]  # 4 words + 3 bigrams, 2 + 1, ...
    text_tensor, first_tokens = prepared.value  # TorchServe's (token ids, tokens) pair
    assert len(text_tensor) == 15 and first_tokens == ["what", "a", "great", "film"]
    together = _handle(handler, [{"body": t.encode()} for t in texts])
    alone = [_handle(handler, [{"data": t}])[0] for t in texts]
    assert len(together) == 3
    for row, single in zip(together, alone, strict=True):
        assert set(row) == {"positive", "negative"}
        assert all(close(row[k], single[k]) for k in row)
    assert together[0]["positive"] > 0.9 and together[1]["negative"] > 0.9
    assert close(together[2]["positive"], 0.5)  # only unknown tokens: no evidence either way


@pytest.fixture
def sentiment(ts: Any, built: Path, tmp_path: Path) -> Any:
    """The TextClassifier on the sentiment model, initialized in this process."""
    return initialized(
        ts.text_classifier.TextClassifier(),
        tmp_path / "model",
        {"modelFile": "text_model.py", "serializedFile": "text_state.pt"},
        TS_MODELS / "text_model.py",
        built / "text_state.pt",
        built / "text" / "source_vocab.pt",
        built / "text" / "index_to_name.json",
    )


@pytest.mark.slow
def test_text_classifier_answers_an_unreadable_text_alone(sentiment: Any) -> None:
    answers = _handle(
        sentiment, [{"body": b"good"}, {"body": b"\xff\xfe"}, {"data": {"x": 1}}, {"data": "bad"}]
    )
    assert answers[0]["positive"] > 0.9 and answers[3]["negative"] > 0.9
    assert isinstance(answers[1], EnvelopeInputError) and "not UTF-8" in answers[1].message
    assert isinstance(answers[2], EnvelopeInputError)
    assert "expected a text" in answers[2].message and "not dict" in answers[2].message
    every_one_bad = _handle(sentiment, [{"body": b"\xff"}, {"body": 3}])
    assert all(isinstance(a, EnvelopeInputError) for a in every_one_bad)


@pytest.mark.slow
def test_text_classifier_inside_micro_batching_answers_as_without(ts: Any, sentiment: Any) -> None:
    """MicroBatching preprocesses one slice while the one before it is in the model: nothing
    of a slice may live on the handler. 7 texts of different lengths, slices of 2."""
    texts = ["good", "bad awful boring film", "love it", "not good at all, no", "great", "", "x"]
    rows = [{"body": t.encode()} for t in texts]
    alone = _handle(sentiment, rows)
    micro = ts.micro.MicroBatching(sentiment, micro_batch_size=2)
    try:
        for _ in range(10):
            context = sentiment.context
            assert micro(rows, context) == alone
    finally:
        micro.shutdown()


def _colour_model() -> Any:
    """Mean of each (normalised) channel -> 3 logits: red, green, blue."""
    import torch

    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3)
    )
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(3))
        model[2].bias.zero_()
    return model.eval()


def _in_process(cls: Any, tmp_path: Path) -> Any:
    """An instance of `cls` serving `_colour_model()` in this process (set up as `initialize`
    would, so that `cls` need not call our __init__)."""
    import torch

    handler = cls()
    handler.device = torch.device("cpu")
    handler.model = _colour_model()
    handler.mapping = None
    handler.context = context_for(tmp_path, {})
    return handler


def test_subclasses_overriding_one_step_get_torchserves_values(ts: Any, tmp_path: Path) -> None:
    """A request that cannot be read is answered alone whichever step a subclass overrides,
    and each overridden step sees what it sees under TorchServe: tensors."""
    import torch

    classifier = ts.classifier.ImageClassifier
    seen: dict[str, type] = {}

    class Digits(classifier):
        def postprocess(self, data: Any) -> list[int]:  # as TorchServe's MNIST example
            seen["postprocess"] = type(data)
            return [int(i) for i in data.argmax(1).tolist()]

    class Forward(classifier):
        def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
            seen["inference"] = type(data)
            with torch.no_grad():
                return self.model(data)

    class Halved(classifier):
        def preprocess(self, data: Any) -> Any:
            batch = super().preprocess(data)
            seen["super().preprocess"] = type(batch)
            return batch / 2

    rows = [
        {"data": encode(solid((250, 0, 0)))},
        {"body": b"junk"},
        {"data": encode(solid((0, 0, 250)))},
    ]
    for cls in (Digits, Forward, Halved, classifier):
        answers = _handle(_in_process(cls, tmp_path), rows)
        assert len(answers) == 3 and isinstance(answers[1], EnvelopeInputError), cls
        if cls is Digits:
            assert answers[0] == 0 and answers[2] == 2
        else:
            assert first(answers[0]) == "0" and first(answers[2]) == "2", cls
    assert seen == {
        "postprocess": torch.Tensor, "inference": torch.Tensor, "super().preprocess": torch.Tensor,
    }  # fmt: skip

    class Own(classifier):
        def preprocess(self, data: Any) -> Any:  # its own batch: every request a model row
            return torch.stack([torch.as_tensor(row["body"]) for row in data])

    tensors = [{"body": [[[v] * 4] * 4 for v in rgb]} for rgb in ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))]
    answers = _handle(_in_process(Own, tmp_path), tensors)
    assert [first(a) for a in answers] == ["0", "2"]


def test_image_classifier_inside_micro_batching_answers_as_without(ts: Any, tmp_path: Path) -> None:
    """TorchServe's micro-batching example handler (an ImageClassifier subclass that does not
    call our __init__), on a batch of 6 in slices of 2, with unreadable requests and a
    request of two images among them."""

    class MicroClassifier(ts.classifier.ImageClassifier):
        def __init__(self) -> None:
            self.handle = ts.micro.MicroBatching(self, micro_batch_size=2)

    red, green, blue = (encode(solid(c)) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250)))
    rows = [
        {"data": red},
        {"body": b"junk"},
        {"a.png": green, "b.png": blue},
        {"data": blue},
        {"note": "no image"},
        {"data": green},
    ]
    alone = _handle(_in_process(ts.classifier.ImageClassifier, tmp_path), rows)
    kinds = [dict, EnvelopeInputError, list, dict, EnvelopeInputError, dict]
    assert [type(a) for a in alone] == kinds
    assert [first(a) for a in alone[2]] == ["1", "2"]
    handler = _in_process(MicroClassifier, tmp_path)
    try:
        for _ in range(5):
            assert plain(_handle(handler, rows)) == plain(alone)
    finally:
        handler.handle.shutdown()


@pytest.mark.slow
@pytest.mark.filterwarnings(JIT_LOAD_DEPRECATED)
def test_explanations_need_captum(ts: Any, built: Path, tmp_path: Path) -> None:
    handler = initialized(
        ts.classifier.ImageClassifier(),
        tmp_path / "model",
        {"serializedFile": "classifier.pt"},
        built / "classifier.pt",
    )
    rows = [{"data": encode(solid((255, 0, 0))), "target": 0}]
    if importlib.util.find_spec("captum") is None:
        with pytest.raises(ts.util.PredictionException, match="need captum") as info:
            _handle(handler, rows, {"explain": "True"})
        assert info.value.error_code == 501
    else:
        attributions = _handle(handler, rows, {"explain": "True"})
        assert len(attributions) == 1 and len(attributions[0]) == 3
    assert first(_handle(handler, rows)[0]) == "0"  # predictions are unaffected (no mapping)


@pytest.mark.slow
@pytest.mark.filterwarnings(JIT_LOAD_DEPRECATED)
def test_limit_max_image_pixels_false_lifts_pils_limit(
    ts: Any, built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    model = {"serializedFile": "classifier.pt"}
    files = (built / "classifier.pt",)
    initialized(ts.classifier.ImageClassifier(), tmp_path / "a", model, *files)
    assert Image.MAX_IMAGE_PIXELS is not None
    settings = {"limit_max_image_pixels": False}
    initialized(ts.classifier.ImageClassifier(), tmp_path / "b", model, *files, **settings)
    assert Image.MAX_IMAGE_PIXELS is None


# -- served by a daemon ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings(JIT_LOAD_DEPRECATED)
def test_image_classifier_answers_the_top5_as_torchserve(
    ts: Any, built: Path, served: Server
) -> None:
    import torch

    png = encode(solid((230, 20, 10)))
    top = ok(served.predict("colours", png, headers={"Content-Type": "image/png"}))
    assert isinstance(top, dict) and len(top) == 5
    assert first(top) == "red" and set(top) <= set(COLOURS)
    values = list(top.values())
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1
    # the same numbers as the model gives, in this process, to our preprocessing
    model = torch.jit.load(str(built / "classifier.pt"))
    batch = ts.T.imagenet()(Image.open(io.BytesIO(png))).unsqueeze(0)
    probabilities = torch.softmax(model(batch), dim=1)[0]
    for label, value in top.items():
        assert close(value, probabilities[COLOURS.index(label)].item())


@pytest.mark.slow
def test_image_classifier_multipart_base64_and_other_modes(served: Server) -> None:
    body, headers = multipart(("data", encode(solid((10, 20, 240)), "JPEG"), "image/jpeg"))
    assert first(ok(served.predict("colours", body, headers=headers))) == "blue"
    text = base64.b64encode(encode(solid((20, 240, 10)))).decode()
    reply = served.predict("colours", text, headers={"Content-Type": "text/plain"})
    assert first(ok(reply)) == "green"
    for image in (Image.new("L", (64, 64), 5), Image.new("RGBA", (64, 64), (250, 5, 5, 128))):
        answer = ok(served.predict("colours", encode(image)))
        assert len(answer) == 5
    assert first(answer) == "red"


@pytest.mark.slow
def test_image_classifier_several_files_in_one_request(served: Server) -> None:
    """tsctl's extension: files not named `data` (as `tsctl infer a.png,b.png` sends them)
    are each classified, answered as a list in order."""
    red, blue = encode(solid((250, 0, 0))), encode(solid((0, 0, 250)))
    body, headers = multipart(("a.png", red, "image/png"), ("b.png", blue, "image/png"))
    answers = ok(served.predict("colours", body, headers=headers))
    assert [first(a) for a in answers] == ["red", "blue"]


@pytest.mark.slow
def test_a_request_without_an_image_is_a_400(served: Server) -> None:
    response = served.predict("colours", b"not an image", headers={"Content-Type": "image/png"})
    assert response.status == 400, response.body
    assert "PIL cannot read" in response.json()["message"]
    assert ok(served.predict("colours", encode(solid((1, 200, 1)))))


@pytest.mark.slow
def test_an_image_over_pils_limit_is_a_400_naming_the_limit(served: Server) -> None:
    response = served.predict("colours", bomb_png(), headers={"Content-Type": "image/png"})
    message = bad_request(response)
    assert f"limit of {2 * Image.MAX_IMAGE_PIXELS} pixels" in message
    assert "limit_max_image_pixels=false" in message


@pytest.mark.slow
def test_a_served_batch_answers_each_request_on_its_own(served: Server) -> None:
    """One real batch of the object detector: two images of different sizes are both
    detected, while an unreadable body and an image over PIL's limit get their own 400."""
    bodies = {
        "boxes": encode(boxes_image()),  # 80x60
        "small": encode(solid((250, 0, 0), (20, 30))),
        "junk": b"not an image",
        "bomb": bomb_png(),
    }
    assert len(bodies) == HELD_BATCH
    folder = served.root / f"hold-{uuid.uuid4().hex}"
    folder.mkdir()
    answers: dict[str, Response] = {}

    def send(key: str, body: Any) -> None:
        answers[key] = served.predict("held", body)

    # the worker is kept busy while the batch queues up, then takes all of it at once
    holder = threading.Thread(target=send, args=("hold", {"hold": str(folder)}))
    holder.start()
    served.wait_for((folder / "holding").exists)
    clients = [threading.Thread(target=send, args=item) for item in bodies.items()]
    for client in clients:
        client.start()
    served.wait_for(lambda: served.queued("held") == HELD_BATCH)
    (folder / "release").touch()
    for thread in [holder, *clients]:
        thread.join(120)
    assert ok(answers["hold"]) == {"held": 1}
    found = ok(answers["boxes"])
    assert [first(d) for d in found] == ["red", "green"]
    assert ok(answers["small"]) == [{"red": [0.0, 0.0, 20.0, 30.0], "score": pytest.approx(0.9)}]
    assert "PIL cannot read" in bad_request(answers["junk"])
    assert "limit_max_image_pixels=false" in bad_request(answers["bomb"])


@pytest.mark.slow
def test_custom_image_classifier_reads_fresh_digits(ts: Any, served: Server) -> None:
    fresh = digit_set(seed=2024, per_digit=3)
    for image, digit in fresh:
        assert ok(served.predict("digits", encode(image))) == digit
    image, digit = fresh[0]
    body, headers = multipart(("data", encode(image, "JPEG"), "image/jpeg"))
    assert ok(served.predict("digits", body, headers=headers)) == digit
    # a list (a JSON body) is the input tensor itself: the handler's preprocessing, done here
    prepare = ts.T.Compose(
        [
            ts.T.Grayscale(),
            ts.T.Resize((28, 28)),
            ts.T.ToTensor(),
            ts.T.Normalize((0.1307,), (0.3081,)),
        ]
    )
    tensor = json.dumps(prepare(image).tolist())
    reply = served.predict("digits", tensor, headers={"Content-Type": "application/json"})
    assert ok(reply) == digit


@pytest.mark.slow
def test_object_detector_answers_boxes_above_the_threshold(served: Server) -> None:
    found = ok(served.predict("detector", encode(boxes_image())))
    assert isinstance(found, list) and len(found) == 2  # blue scores 0.3 < 0.5
    assert found[0] == {"red": [10.0, 5.0, 30.0, 25.0], "score": pytest.approx(0.9)}
    assert found[1] == {"green": [40.0, 30.0, 70.0, 50.0], "score": 0.5}  # >= threshold
    assert ok(served.predict("detector", encode(solid((0, 0, 0), (20, 20))))) == []


@pytest.mark.slow
def test_image_segmenter_answers_class_and_probability_per_pixel(served: Server) -> None:
    image = Image.new("RGB", (256, 256), (0, 0, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 127, 255), fill=(255, 0, 0))
    draw.rectangle((0, 0, 255, 63), fill=(0, 0, 0))
    pixels = ok(served.predict("segmenter", encode(image)))
    assert len(pixels) == 224 and all(len(row) == 224 for row in pixels)
    assert all(len(p) == 2 and 0 < p[1] <= 1 for row in pixels for p in row)
    # crop offset 16: rows < 48 are black, columns < 112 red, the rest blue
    assert pixels[0][0][0] == 0.0 and pixels[47][200][0] == 0.0
    assert pixels[48][0][0] == 1.0 and pixels[223][111][0] == 1.0
    assert pixels[48][112][0] == 2.0 and pixels[223][223][0] == 2.0


@pytest.mark.slow
def test_text_classifier_answers_each_label_probability(served: Server) -> None:
    answer = ok(served.predict("sentiment", "I <b>LOVE</b> it, it's great!"))
    assert set(answer) == {"positive", "negative"}
    assert close(sum(answer.values()), 1) and answer["positive"] > 0.9
    reply = served.predict(
        "sentiment", "Boring &amp; AWFUL.", headers={"Content-Type": "text/plain"}
    )
    assert ok(reply)["negative"] > 0.9
    body, headers = multipart(("data", b"bad, bad, bad", "text/plain"))
    assert ok(served.predict("sentiment", body, headers=headers))["negative"] > 0.9
