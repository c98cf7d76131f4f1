"""Per-model Python dependencies: an archive's requirements file, installed for its model only.

With `install_py_dep_per_model=true` (off by default, as in TorchServe), a model whose manifest
names a `requirementsFile` gets those requirements installed before its first worker starts:
`python -m pip install --upgrade --target DIR -r FILE`, run with the server's own interpreter
in the extracted model folder (so relative paths such as `./mypkg` resolve inside the archive),
bounded by `install_py_dep_timeout`. Nothing goes into the server's environment: the worker puts
DIR on its `sys.path` (after the model folder, before site-packages, where TorchServe's
install into the model folder lands too).

DIR is a cache entry, `<model_deps_dir>/<sha256>`, keyed by the requirements file's content,
the contents of the local files and folders it names, and the interpreter's version and
platform: a restart, or a second version or model with the same requirements, reuses it
without running pip. pip installs into a temporary folder beside it that is renamed into
place only when pip succeeded, so a crash or a timeout never leaves a half-filled entry (a
crash may leave a `.partial-*` folder, which is safe to delete). The default cache folder is
`.tsctl-deps` in the model store: it outlives the daemon, sits on the same storage as the
archives whose code it extends (the same trust: whoever can write there can already change the
code tsctl runs), and is never read as a model. Without a model store it is a folder of the
daemon's temporary work directory, which goes when the daemon stops.

Runs on the daemon's event loop: file work goes to a thread, pip to a subprocess; waiting for
either never blocks the loop, and a cancelled install stops pip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tsctl.errors import ArchiveError
from tsctl.server.config import ServerConfig

log = logging.getLogger("tsctl.server")

#: the folder in the model store that holds installed dependencies when `model_deps_dir` is unset
STORE_FOLDER = ".tsctl-deps"
#: written into each cache entry: the requirements it was installed from
RECORD_FILE = ".tsctl-requirements.txt"
#: how much of pip's output is kept for the error message and the log
_TAIL_BYTES = 32 << 10
_CACHE_VERSION = b"tsctl-model-deps 1"


class DependencyInstallFailed(ArchiveError):
    """pip could not install a model's requirements (or took too long); the model is not
    loaded. TorchServe answers these 400 with the type `ModelException`; so does tsctl."""

    type_name = "ModelException"


async def install(
    config: ServerConfig,
    model_name: str,
    model_dir: Path,
    requirements_file: str | None,
    work_dir: Path,
) -> Path | None:
    """Install the model's requirements if the archive has some and the server allows it.

    Returns the folder to put on the worker's `sys.path`, or None when there is nothing to add.
    Raises `ArchiveError` when the archive names a requirements file it lacks, and
    `DependencyInstallFailed` when pip fails or runs past `install_py_dep_timeout`.
    """
    if not requirements_file:
        return None
    if not config.install_py_dep_per_model:
        log.warning(
            "model %s has the requirements file %s, but install_py_dep_per_model is false: "
            "its Python dependencies were not installed",
            model_name,
            requirements_file,
        )
        return None
    requirements = _inside(model_dir, requirements_file)
    root = cache_root(config, work_dir)
    key, text = await asyncio.to_thread(cache_key, requirements, model_dir)
    if not _requirement_lines(text.decode("utf-8", "replace")):
        log.info("model %s: %s lists no requirements", model_name, requirements_file)
        return None
    entry = root / key
    if await asyncio.to_thread(entry.is_dir):
        log.info(
            "model %s: reusing the Python dependencies installed from %s in %s",
            model_name,
            requirements_file,
            entry,
        )
        return entry
    partial = await asyncio.to_thread(_new_partial, root, key)
    try:
        log.info(
            "model %s: installing the Python dependencies in %s into %s",
            model_name,
            requirements_file,
            entry,
        )
        started = time.monotonic()
        await _pip(config, model_name, model_dir, requirements, requirements_file, partial)
        await asyncio.to_thread(_commit, partial, entry, text)
        log.info(
            "model %s: installed the Python dependencies in %s in %.1f s",
            model_name,
            requirements_file,
            time.monotonic() - started,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, partial, True)
    return entry


def cache_root(config: ServerConfig, work_dir: Path) -> Path:
    """Where installed dependencies are cached (see the module docstring)."""
    if config.model_deps_dir is not None:
        return config.model_deps_dir.resolve()
    if config.model_store is not None:
        return (config.model_store / STORE_FOLDER).resolve()
    return work_dir / "deps"


def cache_key(requirements: Path, model_dir: Path) -> tuple[str, bytes]:
    """(the cache entry's name, the requirements file's bytes). Blocking: reads files."""
    text = _read(requirements)
    digest = hashlib.sha256(_CACHE_VERSION)
    interpreter = f"{sys.implementation.cache_tag}{sys.abiflags} {sysconfig.get_platform()}"
    for part in (interpreter.encode(), text):
        digest.update(len(part).to_bytes(8, "big") + part)
    for name, path in _local_references(text.decode("utf-8", "replace"), requirements, model_dir):
        digest.update(b"\0ref\0" + name.encode() + b"\0" + _content_digest(path))
    return digest.hexdigest(), text


def _inside(model_dir: Path, requirements_file: str) -> Path:
    path = (model_dir / requirements_file).resolve()
    if not path.is_relative_to(model_dir.resolve()):
        raise ArchiveError(
            f"requirements file {requirements_file!r} in the manifest is outside the archive"
        )
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArchiveError(
            f"cannot read the requirements file {path.name!r} the manifest names: "
            f"{exc.strerror or exc}"
        ) from None


def _requirement_lines(text: str) -> list[str]:
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


_NESTED = ("-r", "--requirement", "-c", "--constraint")
_EDITABLE = ("-e", "--editable")


def _local_references(text: str, requirements: Path, model_dir: Path) -> list[tuple[str, Path]]:
    """The local files and folders a requirements file names (nested `-r`/`-c` files, local
    packages and wheels), followed one level of nesting at a time, each at most once."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = {requirements}
    queue = [(text, requirements.parent)]
    while queue:
        body, base = queue.pop(0)
        for line in _requirement_lines(body):
            option, _, rest = line.partition(" ")
            option, eq, value = option.partition("=")
            value = value if eq else rest.strip()
            if option in _NESTED:
                path = (base / value).resolve()
                if path not in seen and path.is_file():
                    seen.add(path)
                    found.append((value, path))
                    queue.append((path.read_text("utf-8", "replace"), path.parent))
                continue
            target = value if option in _EDITABLE else line
            if option.startswith("-") and option not in _EDITABLE:
                continue
            target = target.split(";", 1)[0].split()[0] if target.split() else ""
            target = target.removeprefix("file://")
            if target.startswith((".", "/")):
                path = (model_dir / target).resolve()  # pip resolves these from its cwd
                if path.exists() and path not in seen:
                    seen.add(path)
                    found.append((target, path))
    return found


def _content_digest(path: Path) -> bytes:
    """SHA-256 of a file's bytes, or of a folder's file names and bytes (caches skipped)."""
    if path.is_file():
        return _file_digest(path)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
        for name in sorted(files):
            file = Path(folder, name)
            relative = file.relative_to(path).as_posix().encode()
            digest.update(len(relative).to_bytes(8, "big") + relative + _file_digest(file))
    return digest.digest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _new_partial(root: Path, key: str) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-{key[:16]}-", dir=root))
    except OSError as exc:
        raise DependencyInstallFailed(
            f"cannot create the dependency cache folder {root}: {exc.strerror or exc} "
            "(set model_deps_dir to a writable folder)"
        ) from None


def _commit(partial: Path, entry: Path, text: bytes) -> None:
    """Move a finished install into place; if another install of the same requirements got
    there first, keep that one."""
    (partial / RECORD_FILE).write_bytes(text)
    try:
        partial.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise


async def _pip(
    config: ServerConfig,
    model_name: str,
    model_dir: Path,
    requirements: Path,
    requirements_file: str,
    target: Path,
) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--upgrade",
        "--target",
        str(target),
        "-r",
        str(requirements),
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=model_dir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: a stop reaches pip's children too
    )
    tail = bytearray()
    try:
        await asyncio.wait_for(_drain(process, tail), config.install_py_dep_timeout)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        raise DependencyInstallFailed(
            f"installing the Python dependencies of model {model_name} from "
            f"{requirements_file} did not finish within {config.install_py_dep_timeout:g} s "
            "(install_py_dep_timeout); pip was stopped"
        ) from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    output = tail.decode("utf-8", "replace")
    if process.returncode != 0:
        log.error(
            "model %s: pip failed installing %s (exit status %s); its output ends:\n%s",
            model_name,
            requirements_file,
            process.returncode,
            output,
        )
        raise DependencyInstallFailed(
            f"installing the Python dependencies of model {model_name} from "
            f"{requirements_file} failed: pip exited with status {process.returncode}: "
            f"{_summary(output)}"
        )
    log.debug("model %s: pip's output ends:\n%s", model_name, output)


async def _drain(process: asyncio.subprocess.Process, tail: bytearray) -> None:
    """Read pip's output to its end, keeping its last `_TAIL_BYTES`; then wait for it."""
    assert process.stdout is not None
    while chunk := await process.stdout.read(1 << 16):
        tail += chunk
        if len(tail) > _TAIL_BYTES:
            del tail[: len(tail) - _TAIL_BYTES]
    await process.wait()


def _summary(output: str, limit: int = 1000) -> str:
    """pip's error lines (or its last lines), as one line for a message."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    chosen = errors[-5:] if errors else lines[-3:]
    text = " | ".join(chosen) or "no output"
    return text if len(text) <= limit else "..." + text[-limit:]
