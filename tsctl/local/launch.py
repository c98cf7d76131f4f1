"""How the CLI starts the daemon: `launch_daemon` forks it, `Launched` is the CLI's handle.

The CLI forks the daemon before it has even read the configuration (importing pydantic and
validating takes it a few tenths of a second). The child runs the function it is given (the
daemon's `tsctl.server.boot.main`), which starts spare workers at once and then waits for the
validated configuration, one JSON line, on a pipe (`Launched.configure`); if the CLI closes
the pipe without sending one (`Launched.abandon`: a bad setting, a daemon already running),
the daemon stops and exits. Standard library imports only: the CLI imports this module first
thing, and every import before the fork delays the spares.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from tsctl.errors import TsctlError

#: the daemon's side of a launch: (config pipe fd, notify pipe fd, early spares, console fd)
#: -> exit status; the console fd is the starter's stdout, kept for `console_log`
DaemonMain = Callable[[int, int, int, int], int]


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


def launch_daemon(daemon_main: DaemonMain, early_spares: int) -> Launched:
    """Fork a process in its own session that runs `daemon_main`, which waits for
    `Launched.configure`. It keeps a copy of this process's stdout (TorchServe's daemon keeps
    its starter's console): `daemon_main` closes it unless the log goes to the console.

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
            console = os.dup(1)  # the starter's stdout, for the log on the console
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            code = daemon_main(config_r, notify_w, early_spares, console)
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
