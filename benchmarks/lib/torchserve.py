"""Start and stop the real TorchServe 0.12 from its own venv, everything it writes in one folder.

`TorchServeLauncher(venv, root)` runs `torchserve --start --ncs --disable-token-auth` with
`root` as the working directory (TorchServe's `logs/`), `root/tmp` as TMPDIR (the launcher's pid
file, `.model_server.pid`) and as TEMP (the Java frontend's java.io.tmpdir: worker sockets,
extracted models), the launcher's output in `root/start.out`, and a new session: the frontend
and its Python workers join the launcher's process group. So it never touches another
TorchServe, another run, or tsctl. `launch()` returns at once and `stop()` runs `torchserve
--stop`; waiting (for the launcher, the models, the processes to go) is the caller's, because
the benchmarks time it and the parity tests (tests/support/torchserve.py) read TorchServe's
logs meanwhile.

`write_properties` writes a config.properties, the format both TorchServe and tsctl read.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def write_properties(path: Path, properties: Mapping[str, object]) -> Path:
    """`key=value` lines, in order."""
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return path


@dataclass(frozen=True)
class TorchServeLauncher:
    """`torchserve --start/--stop` from `venv`, in the folder `root` (see the module docstring)."""

    venv: Path
    root: Path
    #: set in the launcher's environment (TorchServe's workers inherit it)
    variables: Mapping[str, str] = field(default_factory=dict)
    #: left out of the launcher's environment: another venv's settings
    unset: tuple[str, ...] = ("VIRTUAL_ENV",)

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "torchserve"

    def env(self) -> dict[str, str]:
        """The launcher's environment: this venv first on PATH, this folder for temp files."""
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        env.update(
            PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            TMPDIR=str(self.tmp),  # the launcher's pid file
            TEMP=str(self.tmp),  # the frontend's java.io.tmpdir: worker sockets, models
            **self.variables,
        )
        return env

    def launch(self, store: Path, config: Path, models: str = "") -> subprocess.Popen[bytes]:
        """Start `torchserve --start` with `models` (its --models value, if any); return the
        launcher's process without waiting for it."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.executable), "--start", "--ncs", "--disable-token-auth",
            "--model-store", str(store), "--ts-config", str(config),
        ]  # fmt: skip
        if models:
            command += ["--models", models]
        with (self.root / "start.out").open("wb") as out:  # the launcher's, then java's output
            return subprocess.Popen(
                command,
                cwd=self.root,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the frontend and its workers join this group
            )

    def frontend_pid(self, timeout: float = 30) -> int:
        """The Java frontend's pid, from the pid file the launcher writes (waits up to
        `timeout` seconds for it)."""
        pid_file = self.tmp / ".model_server.pid"
        deadline = time.monotonic() + timeout
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return int(pid_file.read_text().strip())

    def stop(self) -> None:
        """`torchserve --stop` (which returns before the processes are gone)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(self.executable), "--stop"],
                cwd=self.root,
                env=self.env(),
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
            )

    def output(self) -> str:
        """The tail of what the launcher and the frontend printed (for error messages)."""
        path = self.root / "start.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
