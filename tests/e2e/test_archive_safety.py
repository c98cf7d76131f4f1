"""Malicious archives are refused before anything is written, and nothing lands outside."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from tsctl.archive.reader import open_archive
from tsctl.errors import ArchiveError, UnsafeArchive

MANIFEST = json.dumps({"runtime": "python", "model": {"modelName": "m", "handler": "h.py"}})


def make_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("h.py", "x = 1\n")
        for info, data in entries:
            zf.writestr(info, data)
        zf.writestr("MAR-INF/MANIFEST.json", MANIFEST)
    return path


def make_tgz(path: Path, members: list[tarfile.TarInfo], prefix: str = "m/") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("h.py", b"x = 1\n"), ("MAR-INF/MANIFEST.json", MANIFEST.encode())):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in members:
            payload = io.BytesIO(b"p" * info.size) if info.isfile() else None
            tf.addfile(info, payload)
    return path


def tar_entry(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def refuse(archive: Path, target: Path, needle: str, max_bytes: int | None = None) -> None:
    """Extraction raises naming `needle` and the archive; nothing new exists anywhere."""
    root = archive.parent
    before = snapshot(root)
    with open_archive(archive) as opened, pytest.raises(UnsafeArchive) as caught:
        if max_bytes is None:
            opened.extract(target)
        else:
            opened.extract(target, max_bytes=max_bytes)
    assert needle in caught.value.message
    assert str(archive) in caught.value.message
    assert snapshot(root) == before  # not even the target directory was created
    assert not Path("/tmp/tsctl-escaped.txt").exists()


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("../evil.txt", "'..' component"),
        ("sub/../../evil.txt", "'..' component"),
        ("..\\evil.txt", "'..' component"),
        ("/tmp/tsctl-escaped.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
    ],
)
def test_zip_path_escapes(tmp_path: Path, name: str, needle: str) -> None:
    archive = make_zip(tmp_path / "evil.mar", [(name, b"pwned")])
    refuse(archive, tmp_path / "target", needle)


def test_zip_symlink(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "link.mar", [(symlink_info("weights.pt"), b"/etc/passwd")])
    refuse(archive, tmp_path / "target", "'weights.pt' is a symbolic link")


def test_zip_expansion_bomb(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.mar", [("zeros.bin", bytes(64 << 20))])
    assert archive.stat().st_size < 1 << 20  # 64 MiB of zeros packs into well under 1 MiB
    refuse(archive, tmp_path / "target", "limit of 16777216 bytes", max_bytes=16 << 20)


def test_many_small_files_add_up_to_the_limit(tmp_path: Path) -> None:
    entries: list[tuple[zipfile.ZipInfo | str, bytes]] = [
        (f"part{i}.bin", bytes(1 << 20)) for i in range(20)
    ]
    archive = make_zip(tmp_path / "parts.mar", entries)
    refuse(archive, tmp_path / "target", "part", max_bytes=10 << 20)


def test_zip_duplicate_entries(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip(tmp_path / "dup.mar", [("h.py", b"import os\n")])
    refuse(archive, tmp_path / "target", "appears twice")


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (tar_entry("m/../../evil.txt"), "'..' component"),
        (tar_entry("/tmp/tsctl-escaped.txt"), "absolute path"),
        (tar_entry("m/link", tarfile.SYMTYPE, link="/etc/passwd"), "is a symbolic link"),
        (tar_entry("m/hard", tarfile.LNKTYPE, link="/etc/passwd"), "is a hard link"),
        (tar_entry("m/dev", tarfile.CHRTYPE), "is not a regular file"),
        (tar_entry("m/fifo", tarfile.FIFOTYPE), "is not a regular file"),
    ],
)
def test_tgz_escapes_and_links(tmp_path: Path, member: tarfile.TarInfo, needle: str) -> None:
    archive = make_tgz(tmp_path / "evil.tar.gz", [member])
    refuse(archive, tmp_path / "target", needle)


def test_tgz_expansion_bomb(tmp_path: Path) -> None:
    archive = make_tgz(tmp_path / "bomb.tar.gz", [tar_entry("m/big.bin", size=32 << 20)])
    refuse(archive, tmp_path / "target", "limit of 1048576 bytes", max_bytes=1 << 20)


def test_directory_with_symlink(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "MAR-INF").mkdir(parents=True)
    (model / "MAR-INF" / "MANIFEST.json").write_text(MANIFEST)
    (model / "h.py").write_text("x = 1\n")
    os.symlink("/etc/passwd", model / "weights.pt")
    refuse(model, tmp_path / "target", "'weights.pt' is a symbolic link")


def test_tgz_entry_outside_the_model_folder(tmp_path: Path) -> None:
    archive = make_tgz(tmp_path / "stray.tar.gz", [tar_entry("other/file.txt")])
    refuse(archive, tmp_path / "target", "outside the archive's folder 'm'")


def test_file_and_folder_of_the_same_name(tmp_path: Path) -> None:
    archive = make_tgz(tmp_path / "clash.tar.gz", [tar_entry("m/sub"), tar_entry("m/sub/w.pt")])
    with (
        open_archive(archive) as opened,
        pytest.raises(ArchiveError, match=r"cannot extract entry 'sub/w\.pt'"),
    ):
        opened.extract(tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_target_must_be_empty(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.mar", [("w.pt", b"w")])
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with open_archive(archive) as opened, pytest.raises(Exception, match="is not empty"):
        opened.extract(target)
    assert snapshot(target) == {"keep.txt"}


def test_safe_archive_extracts_exactly_its_files(tmp_path: Path) -> None:
    archive = make_tgz(
        tmp_path / "ok.tar.gz",
        [tar_entry("m/sub", tarfile.DIRTYPE), tar_entry("m/sub/w.pt", size=9)],
    )
    with open_archive(archive) as opened:
        target = opened.extract(tmp_path / "target")
    assert snapshot(target) == {"h.py", "MAR-INF", "MAR-INF/MANIFEST.json", "sub", "sub/w.pt"}
    assert (target / "sub" / "w.pt").read_bytes() == b"p" * 9
