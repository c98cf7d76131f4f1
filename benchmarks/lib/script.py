"""What every benchmark script does around its measurements: log progress to stderr, run a
command that must succeed, check that the programs it needs are there, and work in one
temporary folder that is removed at the end, even when the run is ended with SIGTERM.

The results themselves go to stdout (the scripts print them); progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

#: the repository (the benchmarks run from its root)
ROOT = Path(__file__).resolve().parents[2]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_checked(command: Sequence[object], timeout: float, **kw: Any) -> str:
    """Run `command` (its items as strings); its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kw
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stderr[-2000:]}")
    return str(done.stdout)


def programs(venv: Path, ts_venv: Path, torchserve: bool) -> tuple[Path, Path, list[Path]]:
    """tsctl's venv's python and tsctl, and every program the run needs (with `torchserve`,
    TorchServe's launcher in `ts_venv` too)."""
    python, tsctl = venv / "bin" / "python", venv / "bin" / "tsctl"
    return python, tsctl, [python, tsctl] + [ts_venv / "bin" / "torchserve"] * torchserve


def missing(files: Iterable[Path], tools: Iterable[str], hints: dict[str, str]) -> str | None:
    """Why the benchmark cannot run (a file that is not there, a tool not on PATH, with its
    hint), or None."""
    for path in files:
        if not path.exists():
            return f"not found: {path}"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH{hints.get(tool, '')}"
    return None


def raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Stoppable(Protocol):
    def stop(self) -> None: ...


@contextlib.contextmanager
def workspace(prefix: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A new temporary folder under `parent` (the system's when None) with an empty `store/`;
    removed at the end unless `keep`. SIGTERM ends the run through this cleanup."""
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        (work / "store").mkdir()
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def stopped_at_end(servers: Iterable[Stoppable]) -> Iterator[None]:
    """Stop every server when the block ends, however it ends (a failed stop is ignored)."""
    try:
        yield
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
