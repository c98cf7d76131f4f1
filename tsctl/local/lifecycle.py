"""Start, stop and find the daemon from the CLI process (never from inside the daemon).

`start` launches the daemon (`tsctl.local.launch.launch`: a fork in its own session) with a
notify pipe and waits for its one readiness line; `stop` signals the recorded pid after
checking it is still our daemon and waits for it to drain and exit.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from tsctl.errors import StartFailed, TsctlError
from tsctl.local import pidfile
from tsctl.local.launch import Launched

#: printed (with more after it) once the server is up, as TorchServe prints it: scripts wait
#: for it
STARTED_LINE = "Model server started."
#: seconds a daemon that closed its notify pipe without a readiness line has to exit
EXIT_GRACE = 10.0


def started_line(pid: int, inference: str, management: str) -> str:
    """What `serve start` prints once the server is up (the daemon logs the same line)."""
    return f"{STARTED_LINE} pid {pid}; inference {inference}, management {management}"


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of a log file (empty when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class AlreadyRunning(TsctlError):
    pass


def running(state_dir: Path) -> pidfile.PidInfo | None:
    """The live daemon recorded in `state_dir`, or None (a stale record is removed)."""
    path = pidfile.pid_path(state_dir)
    info = pidfile.read(path)
    if info is None:
        return None
    if pidfile.is_alive(info):
        return info
    pidfile.remove(path, info.pid)
    return None


def start(
    launched: Launched, config_json: str, state_dir: Path, log_dir: Path, timeout: float
) -> dict[str, Any]:
    """Send the `launched` daemon its configuration (`ServerConfig` as JSON) and wait until it
    is ready; raises `StartFailed` with the reason."""
    try:
        pidfile.prepare_state_dir(state_dir)
        live = running(state_dir)
    except TsctlError:
        launched.abandon()
        raise
    if live is not None:
        launched.abandon()
        raise AlreadyRunning(
            f"tsctl is already running (pid {live.pid}, {live.inference_address}); "
            "run `tsctl serve stop` first"
        )
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        launched.configure(config_json)
        line, closed = _read_line(launched, timeout)
    except OSError as exc:  # it exited before reading its configuration
        line, closed = "", True
        if not isinstance(exc, BrokenPipeError):
            raise
    finally:
        os.close(launched.notify_fd)
    if not line:
        # a closed pipe: it is exiting (give it a moment to be reaped, not to report "not
        # ready within 300 s" about a daemon that failed at once)
        code = launched.wait(EXIT_GRACE) if closed else launched.poll()
        if code is None:
            launched.kill()
            raise StartFailed(f"the server did not become ready within {timeout:g} s")
        last = tail(log_dir / "ts_log.log")
        raise StartFailed(f"the server exited during start-up (exit status {code})", last)
    message: dict[str, Any] = json.loads(line)
    if not message.get("ok"):
        launched.wait(timeout=30)
        raise StartFailed(str(message.get("error")), list(message.get("log_tail", [])))
    return message


def _read_line(launched: Launched, timeout: float) -> tuple[str, bool]:
    """The daemon's readiness line (empty if none came), and whether it closed the pipe or
    exited."""
    fd = launched.notify_fd
    deadline = time.monotonic() + timeout
    data = b""
    closed = False
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                closed = True
                break
            data += chunk
        elif launched.poll() is not None:
            closed = True
            break
    return data.decode("utf-8", "replace").strip(), closed


class StopOutcome(Enum):
    STOPPED = "stopped"
    KILLED = "killed"
    NOT_RUNNING = "not running"
    STALE = "stale pid file removed"


@dataclass(frozen=True)
class Stopped:
    outcome: StopOutcome
    pid: int | None = None


def stop(state_dir: Path, timeout: float) -> Stopped:
    """Signal the daemon to drain and exit; kill it if it has not exited within `timeout`."""
    path = pidfile.pid_path(state_dir)
    info = pidfile.read(path)
    if info is None:
        if path.exists():
            pidfile.remove(path)
            return Stopped(StopOutcome.STALE)
        return Stopped(StopOutcome.NOT_RUNNING)
    if not pidfile.is_alive(info):
        pidfile.remove(path, info.pid)
        return Stopped(StopOutcome.STALE, info.pid)
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pidfile.is_alive(info):
            return Stopped(StopOutcome.STOPPED, info.pid)
        time.sleep(0.05)
    if not pidfile.is_alive(info):  # checked again: the pid is signalled only while it is ours
        return Stopped(StopOutcome.STOPPED, info.pid)
    os.killpg(info.pid, signal.SIGKILL)  # the daemon leads its session: its workers too
    pidfile.remove(path, info.pid)
    return Stopped(StopOutcome.KILLED, info.pid)
