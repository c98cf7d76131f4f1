"""The README's main job through the CLI: build, archive, serve, infer, stop (resnet_faces)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.cli import assert_user_error, run_tsctl
from tests.support.daemon import Server
from tests.support.paths import ROOT

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "resnet_faces"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("faces"))
    root = srv.root
    for script, args in (
        ("build_model.py", ["--out", str(root / "resnet_faces.pt")]),
        ("make_images.py", ["--out-dir", str(root / "images")]),
    ):
        subprocess.run(
            [sys.executable, str(EXAMPLE / script), *args], check=True, capture_output=True
        )
    archived = run_tsctl(
        "archive",
        "--model-name",
        "resnet_faces",
        "--version",
        "1.0",
        "--serialized-file",
        root / "resnet_faces.pt",
        "--handler",
        EXAMPLE / "handler.py",
        "--export-path",
        srv.store.mkdir() or srv.store,
        "-f",
    )
    assert archived.returncode == 0, archived.stderr
    srv.properties["batch_size"] = 8
    srv.properties["max_batch_delay"] = 50
    srv.start("resnet_faces.mar")
    yield srv
    assert srv.stop().returncode == 0


def infer(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return srv.tsctl("infer", "resnet_faces", *args, "--url", srv.inference)


def test_two_images_in_one_request(served: Server) -> None:
    images = served.root / "images"
    result = infer(served, f"{images / 'face_a.jpg'},{images / 'face_b.jpg'}")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer) == 2
    assert all(len(face) == 136 and all(isinstance(v, float) for v in face) for face in answer)
    assert answer[0] != answer[1]


def test_each_image_in_its_own_request(served: Server) -> None:
    images = served.root / "images"
    files = ",".join(str(images / f) for f in ("face_a.jpg", "face_b.jpg", "face_c.jpg"))
    result = infer(served, files, "--each")
    assert result.returncode == 0, result.stderr
    # one JSON document per file, in file order: parse them back out of the stream
    decoder = json.JSONDecoder()
    text, docs, pos = result.stdout.strip(), [], 0
    while pos < len(text):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = len(text) - len(text[pos:].lstrip())
    assert len(docs) == 3 and all(len(face) == 136 for face in docs)


def test_output_file(served: Server) -> None:
    out = served.root / "answer.json"
    result = infer(served, str(served.root / "images" / "face_a.jpg"), "-o", str(out))
    assert result.returncode == 0 and result.stdout == ""
    assert len(json.loads(out.read_text())) == 136


@pytest.mark.daemon_errors("send images as the request body or as multipart files")
def test_infer_errors(served: Server) -> None:
    image = str(served.root / "images" / "face_a.jpg")
    missing = served.tsctl("infer", "nomodel", image, "--url", served.inference)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "tsctl: error: 404 ModelNotFoundException: Model not found: nomodel"
    ]
    assert_user_error(infer(served, "no/such/file.jpg"), "no/such/file.jpg")
    unreachable = served.tsctl("infer", "resnet_faces", image, "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server at http://127.0.0.1:9" in lines[0]
    text = served.root / "notes.txt"
    text.write_bytes(b"\x00not an image")
    not_an_image = served.tsctl("infer", "resnet_faces", str(text), "--url", served.inference)
    assert not_an_image.returncode == 1
    # the handler refuses it with a PredictionException: its message and code reach the client
    assert not_an_image.stderr.startswith("tsctl: error: 400 ")
    assert "send images as the request body or as multipart files" in not_an_image.stderr
