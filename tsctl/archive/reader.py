"""Open and safely extract model archives in all of torch-model-archiver's formats.

`open_archive(path)` recognises the format by content, not by name: a zip (`default` and
`zip-store` .mar files), a gzipped tar (`tgz`, whose files sit under one top folder), or a
directory (`no-archive`). It reads and validates the manifest at once.

`extract(target)` writes nothing until every entry has been checked: it refuses absolute paths,
`..` components, symbolic and hard links, device files, duplicate names, and archives whose
files add up to more than `max_bytes`; while copying it also counts real bytes, so an entry
that lies about its size is caught too. Errors name the archive and the offending entry.
Callers run this off the event loop: it does blocking file I/O.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from tsctl.archive.manifest import MANIFEST_PATH, Manifest, parse_manifest
from tsctl.errors import ArchiveError, UnsafeArchive

#: default bound on the total size of an archive's files once extracted (16 GiB)
DEFAULT_MAX_EXPANDED_BYTES = 16 << 30
_MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")

Kind = Literal["file", "dir", "symlink", "hardlink", "special"]


class ArchiveKind(str, Enum):
    ZIP = "zip"
    TGZ = "tgz"
    DIRECTORY = "directory"


@dataclass(frozen=True)
class Member:
    """One entry: its name relative to the archive's root, its size, and what it is."""

    name: str
    size: int
    kind: Kind = "file"


def open_archive(path: str | os.PathLike[str]) -> ModelArchive:
    """Open a model archive of any format and read its manifest."""
    location = Path(path)
    if location.is_dir():
        return DirectoryArchive(location)
    try:
        with location.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise ArchiveError(f"archive not found: {location}") from None
    except OSError as exc:
        raise ArchiveError(f"cannot read archive {location}: {exc.strerror}") from None
    if magic[:2] == b"PK":
        return ZipArchive(location)
    if magic[:2] == b"\x1f\x8b":
        return TarArchive(location)
    raise ArchiveError(
        f"{location} is not a model archive: expected a zip .mar, a .tar.gz or a directory"
    )


def safe_name(archive: Path, name: str) -> str:
    """`name` as a clean relative path, or `UnsafeArchive` if it could escape the target."""
    if not name or "\x00" in name:
        raise UnsafeArchive(f"{archive}: entry {name!r} has an empty or invalid name")
    if name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(name):
        raise UnsafeArchive(f"{archive}: entry {name!r} has an absolute path")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: entry {name!r} has a '..' component")
    return "/".join(parts)


class ModelArchive(ABC):
    """An opened archive. Use as a context manager, or call `close()`."""

    kind: ArchiveKind

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest: Manifest = parse_manifest(self._read_manifest(), str(path))

    @abstractmethod
    def members(self) -> list[Member]:
        """Every entry, in archive order, names relative to the model's root."""

    @abstractmethod
    def _read_manifest(self) -> bytes: ...

    @abstractmethod
    def _open_member(self, name: str) -> IO[bytes]:
        """A readable stream of the file member `name` (as `members()` names it)."""

    def close(self) -> None:  # noqa: B027 - a no-op default; formats with handles override it
        pass

    def __enter__(self) -> ModelArchive:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check(self, max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES) -> list[Member]:
        """Refuse an archive that is unsafe to extract; return its members with clean names."""
        clean: list[Member] = []
        seen: set[str] = set()
        total = 0
        for member in self.members():
            name = safe_name(self.path, member.name)
            if member.kind in ("symlink", "hardlink"):
                kind = "symbolic" if member.kind == "symlink" else "hard"
                raise UnsafeArchive(f"{self.path}: entry {member.name!r} is a {kind} link")
            if member.kind == "special":
                raise UnsafeArchive(f"{self.path}: entry {member.name!r} is not a regular file")
            if member.kind == "file" and name in seen:
                raise UnsafeArchive(f"{self.path}: entry {member.name!r} appears twice")
            seen.add(name)
            total += member.size
            if total > max_bytes:
                raise UnsafeArchive(
                    f"{self.path}: expands to more than the limit of {max_bytes} bytes "
                    f"(at entry {member.name!r})"
                )
            clean.append(Member(name, member.size, member.kind))
        return clean

    def extract(self, target: Path, max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES) -> Path:
        """Extract every file under `target` (new or empty) after checking the whole archive."""
        members = self.check(max_bytes)
        originals = {m.name: m for m in self.members()}
        created = not target.exists()
        if not created and any(target.iterdir()):
            raise ArchiveError(f"cannot extract {self.path}: {target} is not empty")
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        budget = max_bytes
        try:
            for member, original in zip(members, originals.values(), strict=True):
                out = root / member.name
                try:
                    if member.kind == "dir":
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with self._open_member(original.name) as src:
                        budget = self._write_member(src, out, member, budget, max_bytes)
                except OSError as exc:
                    raise ArchiveError(
                        f"{self.path}: cannot extract entry {original.name!r}: {exc.strerror}"
                    ) from None
        except BaseException:
            if created:
                shutil.rmtree(target, ignore_errors=True)
            else:
                for child in target.iterdir():
                    _remove_tree(child)
            raise
        return target

    def _write_member(
        self, src: IO[bytes], out: Path, member: Member, budget: int, max_bytes: int
    ) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        written = 0
        with os.fdopen(os.open(out, flags, 0o644), "wb") as sink:
            try:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    budget -= len(chunk)
                    if written > member.size or budget < 0:
                        raise UnsafeArchive(
                            f"{self.path}: entry {member.name!r} holds more data than it declares "
                            f"or the archive passes the limit of {max_bytes} bytes"
                        )
                    sink.write(chunk)
            except (*_ZIP_ERRORS, tarfile.TarError) as exc:
                raise ArchiveError(
                    f"{self.path}: entry {member.name!r} is corrupt or truncated ({exc})"
                ) from None
        return budget


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


#: what zipfile raises, besides OSError, for an entry that is corrupt (BadZipFile, zlib.error,
#: EOFError), uses a compression method or zip version it lacks (NotImplementedError), is
#: encrypted (RuntimeError) or has a name flagged UTF-8 that is not (UnicodeDecodeError)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)


class ZipArchive(ModelArchive):
    """A `.mar` (zip, deflated or stored)."""

    kind = ArchiveKind.ZIP
    #: where the manifest is (a subclass for another zip format names its own)
    manifest_path = MANIFEST_PATH

    def __init__(self, path: Path) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
        except (*_ZIP_ERRORS, OSError) as exc:
            raise ArchiveError(f"{path} is corrupt or truncated: {exc}") from None
        try:
            self._opened(path)
        except BaseException:
            self._zip.close()
            raise

    def _opened(self, path: Path) -> None:
        """Read the manifest once the zip is open (the hook a subclass whose manifest is
        another document overrides)."""
        super().__init__(path)

    def close(self) -> None:
        self._zip.close()

    def _read_manifest(self) -> bytes:
        where = self.manifest_path
        try:
            info = self._zip.getinfo(where)
        except KeyError:
            raise ArchiveError(f"{self.path}: missing {where}") from None
        if info.file_size > _MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{self.path}: {where} is implausibly large")
        try:
            return self._zip.read(info)
        except (*_ZIP_ERRORS, OSError) as exc:
            raise ArchiveError(f"{self.path} is corrupt or truncated: {exc}") from None

    def members(self) -> list[Member]:
        return [
            Member(info.filename, info.file_size, _zip_kind(info)) for info in self._zip.infolist()
        ]

    def _open_member(self, name: str) -> IO[bytes]:
        try:
            return self._zip.open(name)
        except (*_ZIP_ERRORS, OSError) as exc:
            raise ArchiveError(f"{self.path}: entry {name!r} cannot be read ({exc})") from None


def _zip_kind(info: zipfile.ZipInfo) -> Kind:
    if info.is_dir():
        return "dir"
    mode = info.external_attr >> 16
    if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "special"


class TarArchive(ModelArchive):
    """A `.tar.gz`; torch-model-archiver puts its files under one `<model-name>/` folder."""

    kind = ArchiveKind.TGZ

    def __init__(self, path: Path) -> None:
        try:
            self._tar = tarfile.open(path, "r:gz")  # noqa: SIM115 - lives as long as self
            self._infos = self._tar.getmembers()
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise ArchiveError(f"{path} is corrupt or truncated: {exc}") from None
        names = {info.name for info in self._infos}
        self._prefix = ""
        if MANIFEST_PATH not in names:
            nested = [n for n in names if n.count("/") == 2 and n.endswith(f"/{MANIFEST_PATH}")]
            if len(nested) == 1:
                self._prefix = nested[0].removesuffix(MANIFEST_PATH)
        self._by_name = {self._relative(info.name): info for info in self._infos}
        try:
            super().__init__(path)
        except BaseException:
            self._tar.close()
            raise

    def _relative(self, name: str) -> str:
        return name[len(self._prefix) :] if name.startswith(self._prefix) else name

    def close(self) -> None:
        self._tar.close()

    def check(self, max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES) -> list[Member]:
        members = super().check(max_bytes)
        top = self._prefix.rstrip("/")
        for info in self._infos:
            if self._prefix and not (info.name.startswith(self._prefix) or info.name == top):
                raise UnsafeArchive(
                    f"{self.path}: entry {info.name!r} is outside the archive's folder {top!r}"
                )
        return members

    def _read_manifest(self) -> bytes:
        info = self._by_name.get(MANIFEST_PATH)
        if info is None or not info.isfile():
            raise ArchiveError(f"{self.path}: missing {MANIFEST_PATH}")
        if info.size > _MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{self.path}: {MANIFEST_PATH} is implausibly large")
        with self._open_member(MANIFEST_PATH) as fh:
            return fh.read()

    def members(self) -> list[Member]:
        return [
            Member(self._relative(info.name), info.size if info.isfile() else 0, _tar_kind(info))
            for info in self._infos
            if info.name.rstrip("/") != self._prefix.rstrip("/") or not info.isdir()
        ]

    def _open_member(self, name: str) -> IO[bytes]:
        stream = self._tar.extractfile(self._by_name[name])
        if stream is None:
            raise ArchiveError(f"{self.path}: entry {name!r} is not a regular file")
        return stream


def _tar_kind(info: tarfile.TarInfo) -> Kind:
    if info.isfile():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "special"


class DirectoryArchive(ModelArchive):
    """A `no-archive` directory: the files as they are, with `MAR-INF/MANIFEST.json`."""

    kind = ArchiveKind.DIRECTORY

    def _read_manifest(self) -> bytes:
        manifest = self.path / MANIFEST_PATH
        if not manifest.is_file():
            raise ArchiveError(f"{self.path}: missing {MANIFEST_PATH}")
        if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{self.path}: {MANIFEST_PATH} is implausibly large")
        return manifest.read_bytes()

    def members(self) -> list[Member]:
        return list(self._walk())

    def _walk(self) -> Iterator[Member]:
        for folder, dirs, files in os.walk(self.path):
            dirs.sort()
            base = Path(folder)
            for name in dirs + sorted(files):
                path = base / name
                mode = path.lstat().st_mode
                rel = path.relative_to(self.path).as_posix()
                if stat.S_ISLNK(mode):
                    yield Member(rel, 0, "symlink")
                elif stat.S_ISDIR(mode):
                    yield Member(rel, 0, "dir")
                elif stat.S_ISREG(mode):
                    yield Member(rel, path.lstat().st_size, "file")
                else:
                    yield Member(rel, 0, "special")

    def _open_member(self, name: str) -> IO[bytes]:
        return (self.path / name).open("rb")
