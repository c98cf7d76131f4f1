"""Every user error in `tsctl archive`: exit 2, one line naming the problem, nothing left behind."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_tsctl
from tsctl.archive.reader import open_archive
from tsctl.archive.writer import ArchiveFormat, ArchiveSpec, plan_archive, write_archive
from tsctl.errors import ArchiveError


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "h.py").write_text("def handle(data, context):\n    return data\n")
    return tmp_path


def archive(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tsctl("archive", "--model-name", "m", *args, cwd=work)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in {"w.pt", "h.py"})


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--serialized-file", "nope.pt", "--handler", "h.py"], ["serialized file", "nope.pt"]),
        (["--model-file", "nope.py", "--handler", "h.py"], ["model file", "nope.py"]),
        (["--handler", "missing_handler.py"], ["handler file", "missing_handler.py"]),
        (["--handler", "missing:fn"], ["handler file", "missing.py"]),
        (["--handler", "h.py", "--extra-files", "w.pt,gone.txt"], ["extra file", "gone.txt"]),
        (["--handler", "h.py", "-r", "req.txt"], ["requirements file", "req.txt"]),
        (["--handler", "h.py", "-c", "cfg.yaml"], ["config file", "cfg.yaml"]),
        (["--handler", "h.py", "--archive-format", "rar"], ["--archive-format", "'rar'"]),
        (["--handler", "h.py", "--runtime", "java"], ["--runtime", "'java'"]),
        (["--handler", "h.py", "--export-path", "no/such/dir"], ["export path", "no/such/dir"]),
        (["--serialized-file", "w.pt"], ["--handler"]),
        (["--handler", ""], ["--handler"]),
    ],
)
def test_bad_inputs(work: Path, args: list[str], needles: list[str]) -> None:
    assert_user_error(archive(work, *args), *needles)
    assert leftovers(work) == []


@pytest.mark.parametrize("name", ["-m", "_m", "bad name", "m/evil", "m@1", "..", "é"])
def test_invalid_model_names(work: Path, name: str) -> None:
    result = run_tsctl("archive", f"--model-name={name}", "--handler", "h.py", cwd=work)
    assert_user_error(result, "invalid model name", repr(name))
    assert leftovers(work) == []


def test_missing_model_name(work: Path) -> None:
    assert_user_error(run_tsctl("archive", "--handler", "h.py", cwd=work), "--model-name")


@pytest.mark.parametrize(("fmt", "produced"), [("default", "m.mar"), ("no-archive", "m")])
def test_existing_output_needs_force(work: Path, fmt: str, produced: str) -> None:
    first = archive(work, "--handler", "h.py", "--archive-format", fmt)
    assert first.returncode == 0, first.stderr
    before = open_archive(work / produced).manifest.created_on

    assert_user_error(archive(work, "--handler", "h.py", "--archive-format", fmt), produced, "-f")
    assert open_archive(work / produced).manifest.created_on == before
    assert leftovers(work) == [produced]

    forced = archive(
        work, "--handler", "h.py", "--serialized-file", "w.pt", "--archive-format", fmt, "-f"
    )
    assert forced.returncode == 0, forced.stderr
    assert open_archive(work / produced).manifest.model.serialized_file == "w.pt"
    assert leftovers(work) == [produced]


def test_version_defaults_to_1_0_and_handler_file_function_form_works(work: Path) -> None:
    result = archive(work, "--handler", "h.py:handle")
    assert result.returncode == 0, result.stderr
    with open_archive(work / "m.mar") as made:
        assert made.manifest.model.model_version == "1.0"
        assert made.manifest.model.handler == "h.py:handle"
        assert [m.name for m in made.members()] == ["h.py", "MAR-INF/MANIFEST.json"]


def test_failure_mid_write_leaves_nothing_behind(work: Path) -> None:
    """A source vanishing after planning: the error names it and no partial output remains."""
    (work / "extra").mkdir()
    (work / "extra" / "a.bin").write_bytes(os.urandom(1000))
    for fmt in ArchiveFormat:
        spec = ArchiveSpec(
            model_name="m",
            handler=str(work / "h.py"),
            serialized_file=work / "w.pt",
            extra_files=(str(work / "extra"),),
            archive_format=fmt,
            export_path=work,
        )
        plan = plan_archive(spec)
        (work / "extra" / "a.bin").rename(work / "extra" / "moved")
        with pytest.raises(ArchiveError, match=r"a\.bin"):
            write_archive(plan)
        (work / "extra" / "moved").rename(work / "extra" / "a.bin")
        assert leftovers(work) == ["extra"], fmt


def test_progress_bar_only_on_a_terminal(work: Path) -> None:
    (work / "big.pt").write_bytes(os.urandom(8 << 20))
    main, child = pty.openpty()
    args = ["archive", "--model-name", "m", "--handler", "h.py", "--serialized-file", "big.pt"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsctl", *args],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=child,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closes when the child exits
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    os.close(main)
    assert b"m.mar" in seen  # the bar's label
    assert b"MB" in seen or b"MiB" in seen  # bytes copied so far


# --- reading bad archives --------------------------------------------------------------------


def test_inspect_missing_archive(work: Path) -> None:
    assert_user_error(run_tsctl("archive", "inspect", "nothere.mar", cwd=work), "nothere.mar")


def test_inspect_not_an_archive(work: Path) -> None:
    (work / "text.mar").write_text("hello, not a zip")
    assert_user_error(
        run_tsctl("archive", "inspect", "text.mar", cwd=work), "text.mar", "not a model archive"
    )


@pytest.mark.parametrize("fmt", ["default", "tgz"])
def test_inspect_truncated_archive(work: Path, fmt: str) -> None:
    assert archive(work, "--handler", "h.py", "--archive-format", fmt).returncode == 0
    name = "m.mar" if fmt == "default" else "m.tar.gz"
    data = (work / name).read_bytes()
    (work / name).write_bytes(data[: len(data) // 2])
    assert_user_error(run_tsctl("archive", "inspect", name, cwd=work), name, "corrupt or truncated")


def test_inspect_archive_without_manifest(work: Path) -> None:
    with zipfile.ZipFile(work / "bare.mar", "w") as zf:
        zf.writestr("h.py", "x = 1\n")
    assert_user_error(
        run_tsctl("archive", "inspect", "bare.mar", cwd=work), "bare.mar", "missing MAR-INF"
    )


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"runtime": "python"}), "model"),
        (json.dumps({"model": {"modelName": "m"}}), "model.handler"),
        (json.dumps({"model": {"modelName": "../x", "handler": "h"}}), "model.modelName"),
        (json.dumps({"runtime": "cobol", "model": {"modelName": "m", "handler": "h"}}), "runtime"),
    ],
)
def test_inspect_invalid_manifest(work: Path, manifest: str, needle: str) -> None:
    (work / "dir" / "MAR-INF").mkdir(parents=True)
    (work / "dir" / "MAR-INF" / "MANIFEST.json").write_text(manifest)
    with zipfile.ZipFile(work / "bad.mar", "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", manifest)
    for target in ("bad.mar", "dir"):
        result = run_tsctl("archive", "inspect", target, cwd=work)
        assert_user_error(result, target, "invalid MAR-INF/MANIFEST.json", needle)
