"""The built-in `base` and `image_classifier` handlers, served for real (workers load torch)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.support.cli import run_tsctl
from tests.support.daemon import Server
from tests.support.paths import FIXTURES

pytestmark = pytest.mark.slow
MODELS = FIXTURES / "models"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("builtin"))
    work = srv.root / "work"
    work.mkdir()
    subprocess.run([sys.executable, str(MODELS / "build.py"), str(work)], check=True)
    srv.store.mkdir()
    for args in (
        ["--model-name", "mlp", "--serialized-file", work / "mlp.pt", "--handler", "base"],
        [
            "--model-name", "tiny", "--serialized-file", work / "tiny_state.pt",
            "--model-file", MODELS / "tiny_net.py", "--handler", "base",
        ],
        [
            "--model-name", "classifier", "--serialized-file", work / "classifier.pt",
            "--extra-files", work / "index_to_name.json", "--handler", "image_classifier",
        ],
    ):  # fmt: skip
        made = run_tsctl("archive", *args, "--export-path", srv.store)
        assert made.returncode == 0, made.stderr
    srv.start("mlp.mar", "tiny.mar", "classifier.mar")
    yield srv
    srv.stop()


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("model", ["mlp", "tiny"])
def test_base_handler_torchscript_and_eager(served: Server, model: str) -> None:
    response = served.predict(model, "[1, 2, 3, 4]", headers={"Content-Type": "application/json"})
    assert response.status == 200, response.body
    expected = json.loads((served.root / "work" / "expected.json").read_text())
    assert close(response.json(), expected[model])


@pytest.mark.daemon_errors("mat1 and mat2 shapes cannot be multiplied")
def test_base_handler_rejects_bad_input_clearly(served: Server) -> None:
    response = served.predict("mlp", "[1, 2]", headers={"Content-Type": "application/json"})
    # an exception the handler did not choose is not client detail (TorchServe's answer); the
    # model log has it under the request id the answer names
    assert response.status == 503
    assert response.json()["message"] == "Prediction failed"
    served.wait_for(lambda: "mat1 and mat2 shapes cannot be multiplied" in served.model_log())
    assert (
        served.predict("mlp", "[1, 2, 3, 4]", headers={"Content-Type": "application/json"}).status
        == 200
    )


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_image_classifier_one_image(served: Server) -> None:
    response = served.predict(
        "classifier", jpeg((200, 30, 30)), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status == 200, response.body
    top = response.json()
    assert len(top) == 5
    assert all(name.startswith("class") for name in top)
    assert abs(sum(top.values()) - 1) < 0.5


def test_image_classifier_each_file_of_a_request_is_one_result(served: Server) -> None:
    images = [served.root / "red.jpg", served.root / "blue.jpg"]
    images[0].write_bytes(jpeg((200, 30, 30)))
    images[1].write_bytes(jpeg((30, 30, 200)))
    result = served.tsctl(
        "infer", "classifier", ",".join(map(str, images)), "--url", served.inference
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == 2 and all(len(a) == 5 for a in answers)
