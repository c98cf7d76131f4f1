"""The daemon's entry point, `python -m tsctl.server.boot NOTIFY_FD EARLY_SPARES`, and the
CLI's way of starting it (`launch`).

The CLI starts this process before it has even read the configuration (importing pydantic and
validating takes it a few tenths of a second): the process at once starts `EARLY_SPARES`
workers (`tsctl.server.spares`), which import torch meanwhile, then reads the validated
configuration, one JSON line, from its stdin. If the CLI closes stdin without sending one (a
bad setting, a daemon already running), it stops its spares and exits. Otherwise it sends its
output to `ts_log.log`, starts the further spares the configuration calls for, and only then
imports the daemon (tornado, grpc, pydantic) and runs it. Standard library imports only here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tsctl.server import spares


@dataclass
class Launched:
    """A daemon started by `launch`, waiting for its configuration."""

    proc: subprocess.Popen[bytes]
    notify_fd: int  # read end of the pipe its readiness line comes on

    def configure(self, config_json: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(config_json.encode() + b"\n")
        finally:
            self.proc.stdin.close()

    def abandon(self) -> None:
        """Close its stdin unconfigured: it stops its spares and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        os.close(self.notify_fd)


def launch(early_spares: int) -> Launched:
    """Start the daemon in its own session; it waits for `Launched.configure`."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tsctl.server.boot", str(write_fd), str(early_spares)],
            pass_fds=(write_fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Launched(proc, read_fd)


def _redirect_output(log_dir: str) -> None:
    log_dir_path = Path(log_dir)
    log_dir_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir_path / "ts_log.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def main() -> int:
    notify_fd, early = int(sys.argv[1]), int(sys.argv[2])
    ahead = spares.prestart(early)
    raw = sys.stdin.readline()
    if not raw.strip():
        ahead.discard()
        return 0
    settings = json.loads(raw)
    _redirect_output(settings["log_dir"])
    more = spares.prestart(spares.expected(settings, spares.cpu_count()) - early)
    ahead.waiting.extend(more.waiting)

    from tsctl.server import daemon

    return daemon.main(raw, notify_fd, ahead)


if __name__ == "__main__":
    sys.exit(main())
