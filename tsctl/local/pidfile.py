"""Where a running daemon is recorded, so `tsctl serve stop/status` find it again.

The file is `.tsctl.pid` in the state directory (by default the temporary directory, as
TorchServe keeps `.model_server.pid` in `TMPDIR`), so two daemons with their own `TMPDIR` or
`--state-dir` coexist. It holds JSON: the pid, the process's start time (to tell our daemon
from an unrelated process that reused the pid), and the API addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

PID_FILE = ".tsctl.pid"


@dataclass(frozen=True)
class PidInfo:
    pid: int
    start_ticks: int | None
    inference_address: str
    management_address: str
    log_dir: str
    metrics_address: str = ""
    key_file: str = ""
    grpc_inference_address: str = ""
    grpc_management_address: str = ""


def default_state_dir() -> Path:
    return Path(tempfile.gettempdir())


def pid_path(state_dir: Path) -> Path:
    return state_dir / PID_FILE


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None if unknown."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def write(path: Path, info: PidInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as fh:
        json.dump(asdict(info), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def read(path: Path) -> PidInfo | None:
    try:
        return PidInfo(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def is_alive(info: PidInfo) -> bool:
    """True if the recorded process still runs and is the same process (not a reused pid)."""
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not ours
    fields = _stat(info.pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # exited, not yet reaped
    ticks = process_start_ticks(info.pid)
    return info.start_ticks is None or ticks is None or ticks == info.start_ticks


def remove(path: Path, pid: int | None = None) -> None:
    """Remove the pid file (only if it still names `pid`, when given)."""
    if pid is not None:
        current = read(path)
        if current is not None and current.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
