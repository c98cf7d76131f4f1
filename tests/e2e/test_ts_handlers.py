"""TorchServe's default handlers served by one tsctl daemon.

The archives are made with the real torch-model-archiver 0.12 from
tests/fixtures/ts_models/build.py's models (the `built` fixture, tests/e2e/conftest.py),
naming the built-in handlers as TorchServe users do (`--handler image_classifier`), plus a
custom `ImageClassifier` subclass serving a digit net trained on generated glyphs. One more
archive, `held` (the ObjectDetector with a hook that keeps its worker busy, batch size 4),
lets a test queue four requests and have them run as one real batch. The same handlers in the
test process: test_ts_transforms.py, test_ts_vision_handlers.py, test_ts_text_handlers.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.fixtures.ts_models.glyphs import digit_set
from tests.support.daemon import Response, Server
from tests.support.ts_handlers import (
    COLOURS,
    JIT_LOAD_DEPRECATED,
    TS_MODELS,
    archive,
    bad_request,
    bomb_png,
    boxes_image,
    build_archives,
    close,
    encode,
    first,
    multipart,
    ok,
    solid,
)

#: requests the `held` model runs as one batch
HELD_BATCH = 4


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
