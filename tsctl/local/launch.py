"""How the CLI starts the daemon (`launch`), and the daemon's first steps (`main`).

The CLI forks the daemon before it has even read the configuration (importing pydantic and
validating takes it a few tenths of a second): the new process, in its own session, at once
starts `early_spares` workers (`tsctl.server.workers.spares`), which import torch meanwhile, then
reads the validated configuration, one JSON line, from a pipe. If the CLI closes the pipe
without sending one (a bad setting, a daemon already running), it stops its spares and exits.
Otherwise it sends its output to `ts_log.log`, starts the further spares the configuration
calls for, and only then imports the daemon (tornado, grpc, pydantic) and runs it. Standard
library imports only here, and at the top only what forking needs: the CLI imports this
module first thing, and every import before the fork delays the spares.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tsctl.errors import TsctlError


class Launched:
    """A daemon started by `launch`, waiting for its configuration: the CLI's handle on it."""

    def __init__(self, pid: int, config_fd: int, notify_fd: int) -> None:
        self.pid = pid
        self.config_fd = config_fd  # write end of the pipe its configuration goes down
        self.notify_fd = notify_fd  # read end of the pipe its readiness line comes on
        self.returncode: int | None = None

    def configure(self, config_json: str) -> None:
        try:
            with os.fdopen(self.config_fd, "wb") as pipe:
                pipe.write(config_json.encode() + b"\n")
        finally:
            self.config_fd = -1

    def abandon(self) -> None:
        """Close its configuration pipe unused: it stops its spares and exits."""
        if self.config_fd >= 0:
            os.close(self.config_fd)
            self.config_fd = -1
        os.close(self.notify_fd)

    def poll(self) -> int | None:
        """Its exit status once it has exited (as `subprocess.Popen.poll`), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def launch(early_spares: int) -> Launched:
    """Start the daemon in its own session; it waits for `Launched.configure`.

    The daemon is a fork of this process rather than a new interpreter: it starts the
    early spares at once, without paying for Python's start and these imports again (the
    spare's torch import is what `serve start` waits for).
    """
    config_r, config_w = os.pipe()
    notify_r, notify_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:  # out of processes or memory
        for fd in (config_r, config_w, notify_r, notify_w):
            os.close(fd)
        raise TsctlError(f"cannot start the server process: {exc.strerror}") from None
    if pid == 0:  # the daemon: never returns to the caller
        code = 1
        try:
            os.setsid()
            os.close(config_w)
            os.close(notify_r)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            code = main(config_r, notify_w, early_spares)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()  # to ts_log.log once output is redirected there
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(config_r)
    os.close(notify_w)
    return Launched(pid, config_w, notify_r)


def _redirect_output(log_dir: str) -> None:
    from pathlib import Path

    log_dir_path = Path(log_dir)
    log_dir_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir_path / "ts_log.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def main(config_fd: int, notify_fd: int, early: int) -> int:
    """The daemon's life: spares first, then its configuration, then the server."""
    import json

    from tsctl.server.workers import spares

    ahead = spares.prestart(early)
    with os.fdopen(config_fd, "rb") as pipe:
        raw = pipe.readline().decode()
    if not raw.strip():
        ahead.discard()
        return 0
    settings = json.loads(raw)
    _redirect_output(settings["log_dir"])
    more = spares.prestart(spares.expected(settings, spares.cpu_count()) - early)
    ahead.waiting.extend(more.waiting)

    from tsctl.server import daemon

    return daemon.main(raw, notify_fd, ahead)
