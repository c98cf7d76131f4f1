"""The cache key of a model's installed dependencies, read within bounds.

The key is a SHA-256 over the interpreter's version and platform, the requirements file's
bytes, and the contents of the local files and folders its lines name (`-r`/`-c` files, `-e`
and plain package paths, `file:` URLs and version control ones over `file:` (`git+file:`,
`hg+file:`, ...), `name @ file:...`, `--find-links` folders), so that
changing any of them installs afresh. Every named path must resolve inside the model folder
(`DependencyInstallFailed` names the file and line otherwise). Reading is bounded: regular
files only, opened without following links and without blocking; inside a named folder, links
count by their target text and special files by name, neither is opened; at most
`MAX_HASHED_BYTES` in all; and not past a deadline (`OutOfTime`). Blocking: the installer
runs it in a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tsctl.errors import ArchiveError, DependencyInstallFailed

_CACHE_VERSION = b"tsctl-model-deps 2"
#: the most bytes the cache key reads: the requirements files and the local files they name
MAX_HASHED_BYTES = 512 << 20


def cache_key(
    requirements: Path,
    model_dir: Path,
    *,
    deadline: float | None = None,
    max_bytes: int = MAX_HASHED_BYTES,
) -> tuple[str, bytes]:
    """(the cache entry's name, the requirements file's bytes). Blocking: reads files.

    Reads only inside `model_dir` (see the module docstring), at most `max_bytes` in all, and
    stops with `DependencyInstallFailed` once `time.monotonic()` passes `deadline`.
    """
    reader = _Reader(model_dir, deadline, max_bytes)
    text = reader.requirements_file(requirements)
    digest = hashlib.sha256(_CACHE_VERSION)
    interpreter = f"{sys.implementation.cache_tag}{sys.abiflags} {sysconfig.get_platform()}"
    for part in (interpreter.encode(), text):
        digest.update(_field(part))
    for name, part in reader.references(text, requirements):
        digest.update(b"ref" + _field(os.fsencode(name)) + _field(part))
    return digest.hexdigest(), text


def _field(data: bytes) -> bytes:
    """`data`, length-prefixed, so that consecutive fields cannot run into each other."""
    return len(data).to_bytes(8, "big") + data


def requirement_lines(text: str) -> list[str]:
    """The logical lines of a requirements file: continuations joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line = pending + raw
        pending = ""
        if line.lstrip().startswith("#"):
            continue
        line = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if line:
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


#: options whose value is a requirements file, read relative to the file that names it
_NESTED = frozenset({"-r", "--requirement", "-c", "--constraint"})
#: options whose value is a package, read relative to pip's working folder (the model's)
_EDITABLE = frozenset({"-e", "--editable"})
#: options whose value is a folder of archives (or a URL)
_FIND_LINKS = frozenset({"-f", "--find-links"})
#: options whose value is an index URL, local only with the `file:` scheme
_INDEXES = frozenset({"-i", "--index-url", "--extra-index-url"})
_SHORT = ("-r", "-c", "-e", "-f", "-i")
#: pip replaces `${NAME}` in a requirements file with the environment variable NAME
_ENV_VARIABLE = re.compile(r"\$\{[A-Z0-9_]+\}")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: `name[extras] @ url`: a direct reference (PEP 508)
_DIRECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(?:\[[^\]]*\])?\s*@\s*(\S+)")
_EXTRAS = re.compile(r"\[[^\]]*\]$")
#: a URL pip reads on this machine: `file:`, or a version control scheme over `file:`
_LOCAL_URL = re.compile(r"^(?:(?P<vcs>[A-Za-z][A-Za-z0-9.-]*)\+)?file:", re.IGNORECASE)
#: the `@revision` ending a version control URL's path
_REVISION = re.compile(r"@[^/]*$")
#: names pip reads as a local archive when such a file exists
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")
#: folders whose content does not change what pip builds
_SKIPPED = frozenset({"__pycache__", ".git"})


def _option(line: str) -> tuple[str, str]:
    """(option, value) of an option line, or ("", line) for a requirement."""
    if not line.startswith("-"):
        return "", line
    try:
        words = shlex.split(line)  # pip reads option lines as shell words
    except ValueError:
        words = line.split()
    head, rest = words[0], words[1:]
    if head.startswith("--"):
        option, eq, value = head.partition("=")
        return option, value if eq else (rest[0] if rest else "")
    if head[:2] in _SHORT and len(head) > 2:  # `-rmore.txt`
        return head[:2], head[2:]
    return head, rest[0] if rest else ""


def _local_target(spec: str) -> str | None:
    """The local path a requirement (or an `-e` value) names, or None for a name or a remote
    URL; `file:` URLs become paths."""
    spec = spec.split(";", 1)[0].strip()  # environment markers
    direct = _DIRECT.match(spec)
    target = direct.group(1) if direct else (spec.split() or [""])[0]
    if _SCHEME.match(target):
        return _file_url_path(target)
    target = _EXTRAS.sub("", target)
    looks_local = target.startswith((".", "/")) or "/" in target or target.endswith(_ARCHIVES)
    return target if looks_local else None


def _file_url_path(url: str) -> str | None:
    """The path of a `file:` URL, or of a version control one on this machine
    (`git+file:`, `hg+file:`, `svn+file:`, `bzr+file:`, whose `@revision` is dropped); None
    for other schemes (pip fetches those)."""
    local = _LOCAL_URL.match(url)
    if local is None:
        return None
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    if local.group("vcs"):
        path = _REVISION.sub("", path)
    if parts.netloc not in ("", "localhost"):
        return "//" + parts.netloc + path  # another host's file: never inside the model
    return urllib.parse.unquote(path)


class _Reader:
    """Reads what the cache key needs, within bounds: only inside the model's folder, only
    regular files, opened without following a symlink and without blocking (a FIFO or a
    device is refused before it is opened), at most `max_bytes` in all, and not past
    `deadline`. Symbolic links inside a named folder count by where they point, unread."""

    def __init__(self, model_dir: Path, deadline: float | None, max_bytes: int) -> None:
        self.root = model_dir.resolve()
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.total = 0
        self.where = ""  # the line being followed, for errors

    def requirements_file(self, path: Path) -> bytes:
        """The bytes of the requirements file the manifest names (`path` is resolved)."""
        try:
            return self._bytes(path)
        except _NotRegular:
            raise ArchiveError(
                f"the requirements file {path.name!r} the manifest names is not a regular file"
            ) from None
        except OSError as exc:
            raise ArchiveError(
                f"cannot read the requirements file {path.name!r} the manifest names: "
                f"{exc.strerror or exc}"
            ) from None

    def references(self, text: bytes, requirements: Path) -> list[tuple[str, bytes]]:
        """(line, digest) for each local file or folder the requirements name, nested
        requirements files followed (each once)."""
        found: list[tuple[str, bytes]] = []
        seen: set[Path] = {requirements}
        queue = [(text, requirements)]
        while queue:
            body, source = queue.pop(0)
            label = source.relative_to(self.root).as_posix()
            for line in requirement_lines(body.decode("utf-8", "replace")):
                self.where = f"{label}: {line!r}"
                option, value = _option(line)
                if option in _NESTED:
                    local = _file_url_path(value) if _SCHEME.match(value) else value
                    path = self._path(local, source.parent)
                    if path is not None and path not in seen and self._exists(path):
                        seen.add(path)
                        nested = self._read_named(path)
                        found.append((self.where, nested))
                        queue.append((nested, path))
                    continue
                if option in _FIND_LINKS or option in _INDEXES:
                    if _SCHEME.match(value):
                        local = _file_url_path(value)
                    else:  # a bare index "URL" is not a folder to pip
                        local = value if option in _FIND_LINKS else None
                    # pip tries a relative folder beside the requirements file first
                    beside = local is not None and os.path.lexists(source.parent / local)
                    base = source.parent if beside else self.root
                elif option in _EDITABLE or not option:
                    local, base = _local_target(value), self.root
                else:
                    continue
                path = self._path(local, base)
                if path is not None and path not in seen and self._exists(path):
                    seen.add(path)
                    found.append((self.where, self._digest(path)))
        return found

    def _path(self, value: str | None, base: Path) -> Path | None:
        """`value` resolved from `base`, refused unless it is inside the model's folder."""
        if value is None or not value:
            return None
        if _ENV_VARIABLE.search(value):
            raise DependencyInstallFailed(
                f"{self.where}: a path with an environment variable may name files outside "
                "the model's folder; an archive's requirements may only name files it ships"
            )
        try:
            path = (base / value).resolve()  # follows symbolic links: where pip would read
        except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
            raise DependencyInstallFailed(f"{self.where}: not a usable path: {exc}") from None
        if not path.is_relative_to(self.root):
            raise DependencyInstallFailed(
                f"{self.where}: names {path}, outside the model's folder; an archive's "
                "requirements may only name files it ships"
            )
        return path

    def _exists(self, path: Path) -> bool:
        """Whether `path` exists (a missing one is left to pip, which names it)."""
        try:
            os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._unreadable(path, exc) from None
        return True

    def _read_named(self, path: Path) -> bytes:
        try:
            return self._bytes(path)
        except _NotRegular:
            raise DependencyInstallFailed(f"{self.where}: {path} is not a regular file") from None
        except OSError as exc:
            raise self._unreadable(path, exc) from None

    def _digest(self, path: Path) -> bytes:
        """SHA-256 of a named file's bytes, or of a named folder's tree."""
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                return self._tree(path)
            return self._file_digest(path)
        except _NotRegular:
            raise DependencyInstallFailed(
                f"{self.where}: {path} is not a regular file or a folder"
            ) from None
        except OSError as exc:
            raise self._unreadable(path, exc) from None

    def _tree(self, top: Path) -> bytes:
        """SHA-256 of a folder: each entry's kind and name, a file's bytes, a link's target.
        Links are never followed; FIFOs, sockets and devices count by name, never opened."""
        digest = hashlib.sha256()
        stack = [(top, "")]
        while stack:
            folder, prefix = stack.pop()
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
            folders = []
            for entry in entries:
                self._check_time()
                name = prefix + entry.name
                raw = os.fsencode(name)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    if entry.name not in _SKIPPED:
                        folders.append((Path(entry.path), name + "/"))
                        digest.update(b"d" + _field(raw))
                elif stat.S_ISLNK(mode):
                    target = os.fsencode(os.readlink(entry.path))
                    digest.update(b"l" + _field(raw) + _field(target))
                elif stat.S_ISREG(mode):
                    data = self._file_digest(Path(entry.path))
                    digest.update(b"f" + _field(raw) + data)
                else:
                    digest.update(b"s" + _field(raw))
            stack.extend(reversed(folders))
        return digest.digest()

    def _bytes(self, path: Path) -> bytes:
        """A (requirements) file's bytes."""
        data = bytearray()
        self._consume(path, data.extend)
        return bytes(data)

    def _file_digest(self, path: Path) -> bytes:
        digest = hashlib.sha256()
        self._consume(path, digest.update)
        return digest.digest()

    def _consume(self, path: Path, sink: Callable[[bytes], object]) -> None:
        """Feed a regular file's bytes to `sink`; `_NotRegular` for anything else, found before
        it is opened (and checked again once open, should it have been swapped)."""
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise _NotRegular
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _NotRegular
            while chunk := stream.read(1 << 20):
                self._check_time()
                self.total += len(chunk)
                if self.total > self.max_bytes:
                    raise DependencyInstallFailed(
                        f"{self.where or path.name}: the files the requirements name hold more "
                        f"than {self.max_bytes} bytes, which tsctl reads to name the "
                        "dependency cache entry; ship the package as a wheel instead"
                    )
                sink(chunk)

    def _check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(
                f"{self.where or 'the requirements file'}: reading the files the requirements "
                "name did not finish within install_py_dep_timeout"
            )

    def _unreadable(self, path: Path, exc: OSError) -> DependencyInstallFailed:
        return DependencyInstallFailed(f"{self.where}: cannot read {path}: {exc.strerror or exc}")


class OutOfTime(DependencyInstallFailed):
    """The deadline passed while the cache key was read."""


class _NotRegular(Exception):
    """A path to read is a FIFO, a device, a socket, a folder or a symbolic link."""
