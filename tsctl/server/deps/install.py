"""Per-model Python dependencies: an archive's requirements file, installed for its model only.

With `install_py_dep_per_model=true` (off by default, as in TorchServe), a model whose manifest
names a `requirementsFile` gets those requirements installed before its first worker starts:
`python -I -m pip install --upgrade --target DIR -r FILE`, run with the server's own interpreter
in the extracted model folder (so relative paths such as `./mypkg` resolve inside the archive),
bounded by `install_py_dep_timeout`. `-I` (isolated mode) keeps the pip that runs the server's
own: neither a `pip/` folder in the archive (the working folder) nor the daemon's `PYTHONPATH`
or user site can stand in for it; pip still reads its own configuration (`pip.conf`, `PIP_*`).
Nothing goes into the server's environment: the worker puts DIR on its `sys.path` (after the
model folder, before site-packages, where TorchServe's install into the model folder lands too).

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

An archive must be self-contained, so the local paths its requirements name (`-r`/`-c` files,
`-e` and plain package paths, `file:` URLs, `name @ file:...`, `--find-links` folders) must
resolve, symbolic links followed, inside the model folder. Any other is refused before pip runs
(TorchServe would let pip read it): `DependencyInstallFailed` (400 `ModelException`) names the
file and the line, as does a path built from an environment variable (pip expands `${NAME}`) or
a named path that is a FIFO, socket or device. Reading them for the key is bounded: regular
files only, opened without following links and without blocking; inside a named folder, links
count by their target text and special files by name, neither is opened; at most
`MAX_HASHED_BYTES` in all; and within the same `install_py_dep_timeout` as pip (one deadline
covers reading and pip together). A named path that does not exist is left to pip to report.

Runs on the daemon's event loop: reading the key goes to a thread (`cache_key`), pip to a
subprocess (`pip`); waiting for either never blocks the loop, and a cancelled install stops
pip (a cancelled read stops at the deadline).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from tsctl.errors import ArchiveError, DependencyInstallFailed
from tsctl.server.config import ServerConfig
from tsctl.server.deps.cache_key import OutOfTime, cache_key, requirement_lines
from tsctl.server.deps.pip import commit, new_partial, run_pip

log = logging.getLogger("tsctl.server")

#: the folder in the model store that holds installed dependencies when `model_deps_dir` is unset
STORE_FOLDER = ".tsctl-deps"


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
    timeout = config.install_py_dep_timeout
    deadline = time.monotonic() + timeout  # for reading the files and running pip together
    try:  # the thread also checks the deadline, so it ends soon after a timeout
        key, text = await asyncio.wait_for(
            asyncio.to_thread(cache_key, requirements, model_dir, deadline=deadline), timeout
        )
    except (TimeoutError, OutOfTime):
        raise DependencyInstallFailed(
            f"reading the files that {requirements_file} of model {model_name} names did not "
            f"finish within {timeout:g} s (install_py_dep_timeout)"
        ) from None
    if not requirement_lines(text.decode("utf-8", "replace")):
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
    partial = await asyncio.to_thread(new_partial, root, key)
    try:
        log.info(
            "model %s: installing the Python dependencies in %s into %s",
            model_name,
            requirements_file,
            entry,
        )
        started = time.monotonic()
        await run_pip(
            config, model_name, model_dir, requirements, requirements_file, partial, deadline
        )
        await asyncio.to_thread(commit, partial, entry, text)
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


def _inside(model_dir: Path, requirements_file: str) -> Path:
    path = (model_dir / requirements_file).resolve()
    if not path.is_relative_to(model_dir.resolve()):
        raise ArchiveError(
            f"requirements file {requirements_file!r} in the manifest is outside the archive"
        )
    return path
