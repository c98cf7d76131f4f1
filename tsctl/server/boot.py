"""The daemon's first steps, in the process `tsctl.local.launch.launch_daemon` forked.

It starts `early` spare workers at once (`tsctl.server.workers.spares`: they import torch
meanwhile), then reads its validated configuration, one JSON line, from a pipe. If the CLI
closes the pipe without sending one, it stops its spares and exits. Otherwise it sends its
output to `ts_log.log`, starts the further spares the configuration calls for, and only then
imports the daemon (tornado, grpc, pydantic) and runs it. Standard library imports only at the
top: the CLI imports this module before it forks, and every import there delays the spares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def main(config_fd: int, notify_fd: int, early: int, console_fd: int = -1) -> int:
    """The daemon's life: spares first, then its configuration, then the server.
    `console_fd`: the starter's stdout, where the log also goes with `console_log`."""
    from tsctl.server.workers import spares  # lazily: it is not needed before the fork

    ahead = spares.prestart(early)
    with os.fdopen(config_fd, "rb") as pipe:
        raw = pipe.readline().decode()
    if not raw.strip():
        ahead.discard()
        return 0
    settings = json.loads(raw)
    if not settings.get("console_log") and console_fd >= 0:
        os.close(console_fd)  # now: whoever reads the starter's output sees its end
        console_fd = -1
    _redirect_output(settings["log_dir"])
    more = spares.prestart(spares.expected(settings, spares.cpu_count()) - early)
    ahead.waiting.extend(more.waiting)

    from tsctl.server import daemon

    return daemon.main(raw, notify_fd, ahead, console_fd)
