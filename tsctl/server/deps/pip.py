"""Running pip for a model's requirements, into a cache entry that appears whole or not at all.

`run_pip` runs `python -I -m pip install --upgrade --target DIR -r FILE` with the server's own
interpreter in the model folder (isolated mode: neither a `pip/` folder in the archive nor the
daemon's `PYTHONPATH` or user site can stand in for the real pip), in its own process group,
bounded by a deadline; past it, pip and its children are killed. DIR is a `new_partial`
folder beside the cache entry, renamed into place by `commit` only when pip succeeded.
Runs on the daemon's event loop (pip is a subprocess; the folder work is for a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tsctl.errors import DependencyInstallFailed
from tsctl.server.config import ServerConfig

log = logging.getLogger("tsctl.server")

#: written into each cache entry: the requirements it was installed from
RECORD_FILE = ".tsctl-requirements.txt"
#: how much of pip's output is kept for the error message and the log
_TAIL_BYTES = 32 << 10


def new_partial(root: Path, key: str) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-{key[:16]}-", dir=root))
    except OSError as exc:
        raise DependencyInstallFailed(
            f"cannot create the dependency cache folder {root}: {exc.strerror or exc} "
            "(set model_deps_dir to a writable folder)"
        ) from None


def commit(partial: Path, entry: Path, text: bytes) -> None:
    """Move a finished install into place; if another install of the same requirements got
    there first, keep that one."""
    (partial / RECORD_FILE).write_bytes(text)
    try:
        partial.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise


async def run_pip(
    config: ServerConfig,
    model_name: str,
    model_dir: Path,
    requirements: Path,
    requirements_file: str,
    target: Path,
    deadline: float,
) -> None:
    command = [
        sys.executable,
        "-I",  # isolated: no PYTHON* variables, no user site, no model folder on sys.path
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
        await asyncio.wait_for(_drain(process, tail), max(0.0, deadline - time.monotonic()))
    except TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
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
