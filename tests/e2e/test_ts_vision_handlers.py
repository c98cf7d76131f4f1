"""TorchServe's vision handlers as tsctl implements them (image classifier, object detector,
image segmenter), in this process through the `ts` fixture (tests/e2e/conftest.py): reading
each request, answering each one alone, postprocessing, subclasses overriding one step, and
TorchServe's micro-batching."""

from __future__ import annotations

import base64
import importlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.ts_handlers import (
    JIT_LOAD_DEPRECATED,
    bare,
    context_for,
    encode,
    first,
    handle,
    initialized,
    plain,
    solid,
)
from tsctl.worker.envelope import EnvelopeInputError


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
        answers = handle(_in_process(cls, tmp_path), rows)
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
    answers = handle(_in_process(Own, tmp_path), tensors)
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
    alone = handle(_in_process(ts.classifier.ImageClassifier, tmp_path), rows)
    kinds = [dict, EnvelopeInputError, list, dict, EnvelopeInputError, dict]
    assert [type(a) for a in alone] == kinds
    assert [first(a) for a in alone[2]] == ["1", "2"]
    handler = _in_process(MicroClassifier, tmp_path)
    try:
        for _ in range(5):
            assert plain(handle(handler, rows)) == plain(alone)
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
            handle(handler, rows, {"explain": "True"})
        assert info.value.error_code == 501
    else:
        attributions = handle(handler, rows, {"explain": "True"})
        assert len(attributions) == 1 and len(attributions[0]) == 3
    assert first(handle(handler, rows)[0]) == "0"  # predictions are unaffected (no mapping)


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
