"""Helpers for tests: run the real CLI in a subprocess and check how it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run_tsctl(
    *args: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m tsctl ARGS` as a user would, capturing its output.

    A daemon started here does not keep this output pipe (`TSCTL_CONSOLE_LOG=false`): it
    would hold it open, and capturing reads to its end. tests/e2e/test_console_logs.py reads
    the console a daemon keeps."""
    return subprocess.run(
        [sys.executable, "-m", "tsctl", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "TSCTL_CONSOLE_LOG": "false", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit status 2, one line on stderr naming the problem, never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tsctl: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
