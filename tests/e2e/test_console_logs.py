"""The daemon's log on the console of the process that started it, as TorchServe's tests read
it: `torchserve --start`'s stdout, read through a pipe after the command has returned."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.local import pidfile

pytestmark = pytest.mark.slow


def start_args(server: Server, *more: str) -> list[str]:
    props = {
        "inference_address": "http://127.0.0.1:0",
        "management_address": "http://127.0.0.1:0",
        "metrics_address": "http://127.0.0.1:0",
        "grpc_inference_port": 0,
        "grpc_management_port": 0,
        "grpc_oip_port": 0,
        "default_workers_per_model": 1,
        "enable_model_api": "true",
    }
    config = server.root / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    server.store.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "tsctl", "serve", "start", "--model-store", str(server.store),
        "--ts-config", str(config), "--ncs", "--disable-token-auth",
        "--state-dir", str(server.state_dir), "--log-dir", str(server.log_dir), *more,
    ]  # fmt: skip


class Console:
    """The lines of a pipe, read with `os.read` (a buffered reader would hide lines from
    `select`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""
        self.ended = False

    def read_until(self, needle: str, timeout: float = 60) -> list[str]:
        """Lines until one holds `needle` (a readiness wait on the pipe itself)."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self.pending:
                line, _, self.pending = self.pending.partition(b"\n")
                lines.append(line.decode())
                if needle in lines[-1]:
                    return lines
            if self.ended:
                break
            ready, _, _ = select.select([self.fd], [], [], 1)
            if ready:
                chunk = os.read(self.fd, 65536)
                self.pending += chunk
                self.ended = not chunk
        raise AssertionError(f"{needle!r} not on the console; got {lines[-30:]}")


@pytest.mark.daemon_errors("cannot load the weights", "starting workers for broken")
def test_background_daemon_keeps_the_starters_stdout(tmp_path: Path) -> None:
    server = Server(tmp_path)
    make_archive(server.store, "swiss", "swiss")
    make_archive(server.store, "broken", "broken")
    env = {**os.environ, "TSCTL_CONSOLE_LOG": "true"}
    # as TorchServe's test utilities start it: stdout and stderr in one pipe
    proc = subprocess.Popen(
        [*start_args(server), "--models", "swiss.mar"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        console = Console(proc.stdout.fileno())
        lines = console.read_until("Model server started. pid")  # the CLI's, or the log's
        assert proc.wait(timeout=60) == 0  # `serve start` returned; the daemon runs on
        server.info = pidfile.read(pidfile.pid_path(server.state_dir))
        if not any("tsctl.server - loaded model swiss" in line for line in lines):
            console.read_until("tsctl.server - loaded model swiss")
        # a handler that fails to load: its traceback reaches the starter's console
        server.manage("POST", "/models?url=broken.mar&initial_workers=1&synchronous=true")
        traceback = console.read_until("RuntimeError: cannot load the weights")
        assert any("Traceback (most recent call last):" in line for line in traceback)
        assert any("MODEL_LOG" in line for line in traceback)
    finally:
        server.stop()
        if proc.stdout is not None:
            proc.stdout.read()  # the daemon is gone: the pipe ends
            proc.stdout.close()
        proc.wait(timeout=60)


def test_no_console_log_lets_a_capturing_caller_return(tmp_path: Path) -> None:
    """A caller that reads the output to its end (`$(tsctl serve start)`) needs it off."""
    server = Server(tmp_path)
    make_archive(server.store, "swiss", "swiss")
    env = {k: v for k, v in os.environ.items() if k != "TSCTL_CONSOLE_LOG"}
    try:
        done = subprocess.run(
            [*start_args(server), "--models", "swiss.mar", "--no-console-log"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Model server started")
        assert "tsctl.server" not in done.stdout  # only the CLI's own lines
    finally:
        server.stop()
