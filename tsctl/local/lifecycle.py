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

from tsctl.errors import TsctlError
from tsctl.local import pidfile
from tsctl.local.launch import Launched, launch
from tsctl.server.config import ServerConfig
from tsctl.server.telemetry import logs

#: printed (with more after it) once the server is up, as TorchServe prints it: scripts wait
#: for it
STARTED_LINE = "Model server started."


class StartFailed(TsctlError):
    """The daemon did not come up; `message` says why, `log_tail` shows the model log."""

    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail or []


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


def start(config: ServerConfig, timeout: float, launched: Launched | None = None) -> dict[str, Any]:
    """Configure the daemon (`launched` early by the caller, or launched now) and wait until
    it is ready; raises `StartFailed` with the reason."""
    launched = launched or launch(early_spares=0)
    live = running(config.state_dir)
    if live is not None:
        launched.abandon()
        raise AlreadyRunning(
            f"tsctl is already running (pid {live.pid}, {live.inference_address}); "
            "run `tsctl serve stop` first"
        )
    try:
        config.log_dir.mkdir(parents=True, exist_ok=True)
        launched.configure(config.model_dump_json())
        line = _read_line(launched, timeout)
    except OSError as exc:  # it exited before reading its configuration
        line = ""
        if not isinstance(exc, BrokenPipeError):
            raise
    finally:
        os.close(launched.notify_fd)
    if not line:
        code = launched.poll()
        if code is None:
            launched.kill()
            raise StartFailed(f"the server did not become ready within {timeout:g} s")
        tail = logs.tail(config.log_dir / "ts_log.log")
        raise StartFailed(f"the server exited during start-up (exit status {code})", tail)
    message: dict[str, Any] = json.loads(line)
    if not message.get("ok"):
        launched.wait(timeout=30)
        raise StartFailed(str(message.get("error")), list(message.get("log_tail", [])))
    return message


def _read_line(launched: Launched, timeout: float) -> str:
    fd = launched.notify_fd
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        elif launched.poll() is not None:
            break
    return data.decode("utf-8", "replace").strip()


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
    os.killpg(info.pid, signal.SIGKILL)
    pidfile.remove(path, info.pid)
    return Stopped(StopOutcome.KILLED, info.pid)
