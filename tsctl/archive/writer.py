"""Write model archives the way torch-model-archiver 0.12 lays them out, but streaming.

Layout (what TorchServe expects): every given file at the archive's root under its base name,
the contents of each `--extra-files` directory at the root with sub-folders kept (hidden
folders, `__pycache__` and `__MACOSX` left out), and `MAR-INF/MANIFEST.json` last. The `tgz`
format puts all of it under a `<model-name>/` folder; `no-archive` writes a directory.

Unlike the reference tool nothing is staged in a temporary copy: each source file is read once,
in fixed-size chunks, straight into the output, so memory stays flat whatever the model's size.
The output is written under a temporary name beside the destination and renamed at the end,
so a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import tarfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import IO

from tsctl.archive.manifest import (
    MANIFEST_PATH,
    Manifest,
    Runtime,
    check_model_name,
    check_model_version,
    is_builtin_handler,
    new_manifest,
)
from tsctl.errors import ArchiveError

CHUNK_SIZE = 1 << 20
_SKIPPED_DIRS = frozenset({"__pycache__", "__MACOSX"})

Progress = Callable[[int], None]


class ArchiveFormat(str, Enum):
    DEFAULT = "default"
    ZIP_STORE = "zip-store"
    TGZ = "tgz"
    NO_ARCHIVE = "no-archive"

    @property
    def suffix(self) -> str:
        return {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz"}.get(self.value, "")


@dataclass(frozen=True)
class ArchiveSpec:
    """What to archive: torch-model-archiver's flags, as values."""

    model_name: str
    handler: str
    version: str | None = None
    serialized_file: Path | None = None
    model_file: Path | None = None
    extra_files: Sequence[str] = ()
    requirements_file: Path | None = None
    config_file: Path | None = None
    runtime: Runtime = Runtime.PYTHON
    archive_format: ArchiveFormat = ArchiveFormat.DEFAULT
    export_path: Path = Path()
    force: bool = False


@dataclass(frozen=True)
class Entry:
    """One file going into the archive: its name inside, where it comes from, its size."""

    arcname: str
    source: Path
    size: int


@dataclass(frozen=True)
class ArchivePlan:
    """Everything checked and decided before the first byte is written."""

    manifest: Manifest
    entries: tuple[Entry, ...]
    destination: Path
    archive_format: ArchiveFormat

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


def plan_archive(spec: ArchiveSpec) -> ArchivePlan:
    """Check every input and decide the archive's contents; raises `ArchiveError` on bad input."""
    check_model_name(spec.model_name)
    if spec.version:
        check_model_version(spec.version)
    export_dir = spec.export_path
    if not export_dir.is_dir():
        raise ArchiveError(f"export path {str(export_dir)!r} is not a directory")
    destination = export_dir / f"{spec.model_name}{spec.archive_format.suffix}"
    if (destination.exists() or destination.is_symlink()) and not spec.force:
        raise ArchiveError(f"{destination} already exists; pass -f/--force to overwrite it")

    entries: dict[str, Entry] = {}

    def add_file(arcname: str, source: Path) -> None:
        entries[arcname] = Entry(arcname, source, source.stat().st_size)

    given = {
        "model file": spec.model_file,
        "serialized file": spec.serialized_file,
        "handler file": _handler_file(spec.handler, spec.runtime),
    }
    for what, path in given.items():
        if path is not None:
            add_file(path.name, _existing_file(path, what))
    for arcname, source in extra_file_entries(spec.extra_files):
        add_file(arcname, source)
    for what, path in {
        "requirements file": spec.requirements_file,
        "config file": spec.config_file,
    }.items():
        if path is not None:
            add_file(path.name, _existing_file(path, what))

    if MANIFEST_PATH in entries:
        raise ArchiveError(
            f"extra files contain {MANIFEST_PATH} ({entries[MANIFEST_PATH].source}); "
            "the archiver writes the manifest itself"
        )
    produced = destination.resolve()
    kept = tuple(e for e in entries.values() if e.source.resolve() != produced)

    manifest = new_manifest(
        model_name=spec.model_name,
        handler=os.path.basename(spec.handler),
        version=spec.version,
        runtime=spec.runtime,
        serialized_file=spec.serialized_file.name if spec.serialized_file else None,
        model_file=spec.model_file.name if spec.model_file else None,
        requirements_file=spec.requirements_file.name if spec.requirements_file else None,
        config_file=spec.config_file.name if spec.config_file else None,
    )
    return ArchivePlan(manifest, kept, destination, spec.archive_format)


def write_archive(plan: ArchivePlan, progress: Progress | None = None) -> Path:
    """Write the planned archive; `progress(n)` is called after every `n` bytes copied."""
    report: Progress = progress or (lambda _n: None)
    destination = plan.destination
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
    writers = {
        ArchiveFormat.DEFAULT: _write_zip,
        ArchiveFormat.ZIP_STORE: _write_zip,
        ArchiveFormat.TGZ: _write_tgz,
        ArchiveFormat.NO_ARCHIVE: _write_directory,
    }
    try:
        writers[plan.archive_format](plan, temporary, report)
        replace_file(temporary, destination)
    except BaseException as exc:
        remove_file(temporary)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            where = exc.filename or destination
            raise ArchiveError(f"cannot write {destination}: {where}: {reason}") from None
        raise
    return destination


def _handler_file(handler: str, runtime: Runtime) -> Path | None:
    """The file a `--handler` value names, or None for a built-in handler."""
    if not handler:
        raise ArchiveError("--handler must not be empty")
    if is_builtin_handler(handler, runtime):
        return None
    module = handler.split(":", 1)[0]
    if runtime is Runtime.LSP:
        return Path(module if module.endswith(".so") else module + ".so")
    return Path(module if module.endswith(".py") else module + ".py")


def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise ArchiveError(f"{what} not found: {path}")
    if not path.is_file():
        raise ArchiveError(f"{what} is not a file: {path}")
    return path


def extra_file_entries(items: Sequence[str]) -> Iterator[tuple[str, Path]]:
    """(name in archive, source) for each `--extra-files` item, as torch-model-archiver does."""
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        is_pattern = any(ch in item for ch in "*?") or ("[" in item and "]" in item)
        if not is_pattern and not os.path.exists(item):
            raise ArchiveError(f"extra file not found: {item}")
        for match in sorted(glob.glob(item)):
            path = Path(match)
            if path.is_file():
                yield path.name, path
            elif path.is_dir():
                yield from _directory_files(path)
            else:
                raise ArchiveError(f"extra file is neither a file nor a directory: {match}")


def _directory_files(root: Path) -> Iterator[tuple[str, Path]]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            source = Path(folder, name)
            if source.is_file():
                yield source.relative_to(root).as_posix(), source


def copy_file(source: Path, sink: IO[bytes], report: Progress) -> None:
    with source.open("rb") as src:
        while chunk := src.read(CHUNK_SIZE):
            sink.write(chunk)
            report(len(chunk))


def _write_zip(plan: ArchivePlan, target: Path, report: Progress) -> None:
    stored = plan.archive_format is ArchiveFormat.ZIP_STORE
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(target, "w", method, allowZip64=True, strict_timestamps=False) as zf:
        for entry in plan.entries:
            info = zipfile.ZipInfo.from_file(entry.source, entry.arcname, strict_timestamps=False)
            info.compress_type = method
            with zf.open(info, "w", force_zip64=entry.size >= zipfile.ZIP64_LIMIT) as sink:
                copy_file(entry.source, sink, report)
        zf.writestr(MANIFEST_PATH, plan.manifest.to_json())


class _CountingReader:
    """A file wrapper that reports what tarfile reads from it."""

    def __init__(self, raw: IO[bytes], report: Progress) -> None:
        self._raw = raw
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._report(len(data))
        return data


def _write_tgz(plan: ArchivePlan, target: Path, report: Progress) -> None:
    root = plan.manifest.model.model_name
    with tarfile.open(target, "w:gz", dereference=True) as tf:
        for entry in plan.entries:
            info = tf.gettarinfo(entry.source, arcname=f"{root}/{entry.arcname}")
            with entry.source.open("rb") as src:
                tf.addfile(info, _CountingReader(src, report))
        data = plan.manifest.to_json().encode()
        info = tarfile.TarInfo(f"{root}/{MANIFEST_PATH}")
        info.size = len(data)
        info.mode = 0o644
        tf.addfile(info, BytesIO(data))


def _write_directory(plan: ArchivePlan, target: Path, report: Progress) -> None:
    target.mkdir()
    for entry in plan.entries:
        out = target / entry.arcname
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as sink:
            copy_file(entry.source, sink, report)
        shutil.copystat(entry.source, out)
    manifest = target / MANIFEST_PATH
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(plan.manifest.to_json())


def replace_file(new: Path, destination: Path) -> None:
    """Put `new` at `destination`, replacing what is there (file or directory)."""
    if destination.is_dir() and not destination.is_symlink():
        aside = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.old")
        destination.rename(aside)
        new.rename(destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, destination)


def remove_file(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
