"""`tsctl archive` against the real torch-model-archiver 0.12, in every format.

The same inputs go through both tools; the outputs must hold the same files at the same names
with the same bytes, and manifests equal field by field (`createdOn` aside). Then tsctl's reader
opens and extracts both tools' archives.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import run_tsctl
from tsctl.archive.reader import open_archive

FORMATS = ["default", "zip-store", "tgz", "no-archive"]
SUFFIX = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
MANIFEST = "MAR-INF/MANIFEST.json"


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A model folder with every kind of input torch-model-archiver takes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.pt").write_bytes(os.urandom(300_000))
    (src / "model.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    (src / "handler.py").write_text("def handle(data, context):\n    return data\n")
    (src / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 50\n")
    (src / "requirements.txt").write_text("pillow\n")
    (src / "index_to_name.json").write_text('{"0": "cat"}')
    extra = src / "extra"
    (extra / "sub" / "deeper").mkdir(parents=True)
    (extra / "vocab.txt").write_text("a\nb\n")
    (extra / ".hidden_file").write_text("kept\n")
    (extra / "sub" / "table.bin").write_bytes(os.urandom(5000))
    (extra / "sub" / "deeper" / "notes.md").write_text("# notes\n")
    for skipped in (".git", "__pycache__", "sub/.cache"):
        (extra / skipped).mkdir()
        (extra / skipped / "junk.txt").write_text("not archived\n")
    return src


CASES: dict[str, list[str]] = {
    "everything": [
        "--serialized-file", "weights.pt", "--model-file", "model.py", "--handler", "handler.py",
        "--extra-files", "extra,index_to_name.json", "--requirements-file", "requirements.txt",
        "--config-file", "model-config.yaml",
    ],
    "builtin-handler": ["--serialized-file", "weights.pt", "--handler", "image_classifier"],
    "module-function": ["--handler", "handler:handle", "--extra-files", "extra/*.txt"],
    "handler-only": ["--handler", "handler"],
}  # fmt: skip


def raw_contents(path: Path, fmt: str) -> dict[str, bytes]:
    """Every file in an archive by its stored name, read with the standard library only."""
    if fmt == "no-archive":
        return {
            p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()
        }
    if fmt == "tgz":
        with tarfile.open(path) as tf:
            return {
                m.name: tf.extractfile(m).read()  # type: ignore[union-attr]
                for m in tf.getmembers()
                if m.isfile()
            }
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def zip_methods(path: Path) -> set[int]:
    with zipfile.ZipFile(path) as zf:
        return {info.compress_type for info in zf.infolist()}


def build_both(tma: Path, inputs: Path, case: str, fmt: str) -> tuple[Path, Path]:
    ours, theirs = inputs.parent / "ours", inputs.parent / "theirs"
    ours.mkdir(exist_ok=True)
    theirs.mkdir(exist_ok=True)
    common = ["--model-name", "m", "--version", "2.1", "--archive-format", fmt, *CASES[case]]
    result = run_tsctl("archive", *common, "--export-path", ours, cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    reference = subprocess.run(
        [str(tma), *common, "--export-path", str(theirs)],
        cwd=inputs,
        capture_output=True,
        text=True,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr
    return ours / f"m{SUFFIX[fmt]}", theirs / f"m{SUFFIX[fmt]}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_same_layout_and_manifest_as_torch_model_archiver(
    tma: Path, inputs: Path, case: str, fmt: str
) -> None:
    ours, theirs = build_both(tma, inputs, case, fmt)
    mine, reference = raw_contents(ours, fmt), raw_contents(theirs, fmt)
    assert sorted(mine) == sorted(reference)
    manifest_name = f"m/{MANIFEST}" if fmt == "tgz" else MANIFEST
    my_manifest = json.loads(mine.pop(manifest_name))
    their_manifest = json.loads(reference.pop(manifest_name))
    assert set(my_manifest) == set(their_manifest)
    for key in their_manifest:
        if key != "createdOn":
            assert my_manifest[key] == their_manifest[key], key
    assert mine == reference
    if fmt in ("default", "zip-store"):
        assert zip_methods(ours) == zip_methods(theirs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_and_extracts_torch_model_archiver_output(
    tma: Path, inputs: Path, tmp_path: Path, fmt: str
) -> None:
    _, theirs = build_both(tma, inputs, "everything", fmt)
    with open_archive(theirs) as archive:
        assert archive.manifest.model.model_name == "m"
        assert archive.manifest.model.handler == "handler.py"
        assert archive.manifest.model.serialized_file == "weights.pt"
        target = archive.extract(tmp_path / "out")
    assert (target / "weights.pt").read_bytes() == (inputs / "weights.pt").read_bytes()
    assert (target / "sub" / "deeper" / "notes.md").read_text() == "# notes\n"
    assert json.loads((target / MANIFEST).read_text())["model"]["modelVersion"] == "2.1"

    shown = run_tsctl("archive", "inspect", theirs, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["manifest"]["model"]["modelName"] == "m"
    assert {"name": "weights.pt", "size": 300_000, "kind": "file"} in doc["files"]
