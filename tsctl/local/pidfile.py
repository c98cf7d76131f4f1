"""Where a running daemon is recorded, so `tsctl serve stop/status` find it again.

The file is `.tsctl.pid` in the state directory: `--state-dir`, else `$TSCTL_STATE_DIR`, else a
per-user directory, `$XDG_RUNTIME_DIR/tsctl` (or `$XDG_STATE_HOME/tsctl`,
`~/.local/state/tsctl`), created with mode 0700. It holds JSON: the pid, the process's start
time, and the API addresses and key file the CLI uses.

The record decides which process `stop` signals and where the CLI sends the daemon's keys, so
it is trusted only when nobody else could have written it (Linux):

- the state directory belongs to this user (or to root) and no one else may write in it,
  unless it has the sticky bit (as `/tmp` has: others cannot replace this user's files there);
- the file belongs to this user and no one else may write it (it is written with mode 0600);
- the process it names is alive, this user's, and started when the record says (its start time
  in `/proc/PID/stat`): a record without a start time, or one whose pid now belongs to another
  process, is stale.

A directory or file that fails the first two checks is an `UnsafeStateFile` error naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tsctl.errors import TsctlError

PID_FILE = ".tsctl.pid"
#: the environment variable that names the state directory when `--state-dir` is not given
STATE_DIR_ENV = "TSCTL_STATE_DIR"


class UnsafeStateFile(TsctlError):
    """A state directory or pid file that someone else could have written."""

    exit_code = 2


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
    #: the Open Inference Protocol's gRPC port (`grpc_oip_port`)
    grpc_oip_address: str = ""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$TSCTL_STATE_DIR`, else `$XDG_RUNTIME_DIR/tsctl`, else `$XDG_STATE_HOME/tsctl`, else
    `~/.local/state/tsctl` (relative XDG values are ignored, as the XDG specification says)."""
    env = os.environ if environ is None else environ
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV])
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "tsctl"
    state_home = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state_home):
        return Path(state_home) / "tsctl"
    return Path.home() / ".local" / "state" / "tsctl"


def pid_path(state_dir: Path) -> Path:
    return state_dir / PID_FILE


def _others_may_write(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def check_state_dir(state_dir: Path) -> None:
    """Raise `UnsafeStateFile` unless only this user (or root) can add or replace files in
    `state_dir` (a missing directory passes: it is created safely)."""
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeStateFile(f"cannot use state directory {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateFile(f"state directory {state_dir} is not a directory")
    if st.st_uid not in (os.getuid(), 0):
        raise UnsafeStateFile(
            f"refusing state directory {state_dir}: it belongs to another user (uid {st.st_uid})"
        )
    if _others_may_write(st.st_mode) and not st.st_mode & stat.S_ISVTX:
        raise UnsafeStateFile(
            f"refusing state directory {state_dir}: others may write in it "
            f"(mode {stat.S_IMODE(st.st_mode):o}; chmod go-w it)"
        )


def prepare_state_dir(state_dir: Path) -> None:
    """Create `state_dir` (mode 0700) if it is missing; raise `UnsafeStateFile` if it is not
    safe to keep a pid file in."""
    if not state_dir.exists():
        try:
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            state_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UnsafeStateFile(
                f"cannot create state directory {state_dir}: {exc.strerror}"
            ) from None
    check_state_dir(state_dir)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The process's state letter (`R`, `S`, `Z`...; field 3 of /proc/PID/stat), or None."""
    fields = _stat(pid)
    return fields[0] if fields else None


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat, Linux),
    or None if unknown."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def write(path: Path, info: PidInfo) -> None:
    """Write the record atomically, mode 0600, in a state directory made safe first."""
    prepare_state_dir(path.parent)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(temporary, flags, 0o600), "w", encoding="utf-8") as fh:
        json.dump(asdict(info), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def read(path: Path) -> PidInfo | None:
    """The record in `path`, or None when there is none (or it is not a record); raises
    `UnsafeStateFile` when the file or its directory could have been written by someone else.
    """
    check_state_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafeStateFile(f"cannot read pid file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateFile(f"refusing pid file {path}: not a regular file")
        if st.st_uid != os.getuid():
            raise UnsafeStateFile(
                f"refusing pid file {path}: it belongs to another user (uid {st.st_uid})"
            )
        if _others_may_write(st.st_mode):
            raise UnsafeStateFile(
                f"refusing pid file {path}: others may write it (mode {stat.S_IMODE(st.st_mode):o})"
            )
        raw = fh.read(1 << 16)
    try:
        info = PidInfo(**json.loads(raw))
    except (ValueError, TypeError):
        return None
    return info if _well_typed(info) else None


def _well_typed(info: PidInfo) -> bool:
    texts = [v for k, v in asdict(info).items() if k not in ("pid", "start_ticks")]
    return (
        type(info.pid) is int
        and 0 < info.pid < 1 << 31
        and (info.start_ticks is None or type(info.start_ticks) is int)
        and all(isinstance(v, str) for v in texts)
    )


def is_alive(info: PidInfo) -> bool:
    """True only if the recorded process still runs, is this user's, and started when the
    record says (a record without a start time is never trusted)."""
    if info.start_ticks is None:
        return False
    try:
        os.kill(info.pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's: not ours
        return False
    if process_state(info.pid) in ("Z", "X"):
        return False  # exited, not yet reaped
    return process_start_ticks(info.pid) == info.start_ticks


def remove(path: Path, pid: int | None = None) -> None:
    """Remove the pid file (only if it still names `pid`, when given)."""
    if pid is not None:
        current = read(path)
        if current is not None and current.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
