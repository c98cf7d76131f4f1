"""The CLI's front door: version, help, entry points, and staying light to import."""

from __future__ import annotations

import subprocess
import sys

from tests.support.cli import BIN, run_tsctl
from tsctl import __version__

HEAVY = ("torch", "grpc", "tornado")

# Runs the CLI in-process and, at exit, prints which heavy top-level modules got imported.
_PROBE = """
import atexit, sys
heavy = {heavy!r}
atexit.register(lambda: sys.stderr.write(
    "HEAVY=" + ",".join(sorted({{m.split('.')[0] for m in sys.modules}} & set(heavy))) + "\\n"))
sys.argv = ["tsctl", *{args!r}]
from tsctl.cli.app import main
main()
"""


def heavy_imports(args: list[str], env: dict[str, str] | None = None) -> tuple[str, str]:
    code = _PROBE.format(heavy=HEAVY, args=args)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    marker = [line for line in result.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, result.stderr
    return marker[-1].removeprefix("HEAVY="), result.stdout


def test_version_flag() -> None:
    result = run_tsctl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tsctl {__version__}"


def test_console_script_and_module_agree() -> None:
    script = subprocess.run(
        [str(BIN / "tsctl"), "--version"], capture_output=True, text=True, check=True
    )
    assert script.stdout == run_tsctl("--version").stdout


def test_no_arguments_shows_help() -> None:
    result = run_tsctl()
    assert result.returncode == 0
    assert "archive" in result.stdout
    assert "Usage" in result.stdout


def test_help_imports_no_heavy_module() -> None:
    for args in (["--help"], ["archive", "--help"], ["archive", "inspect", "--help"]):
        heavy, out = heavy_imports(args)
        assert "Usage" in out
        assert heavy == "", f"tsctl {' '.join(args)} imported {heavy}"


def test_unknown_command_is_one_line() -> None:
    result = run_tsctl("frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["tsctl: error: No such command 'frobnicate'."]


def test_early_daemon_only_for_a_background_start_with_models() -> None:
    from tsctl.cli.entry import wants_early_daemon

    assert wants_early_daemon(["serve", "start", "--models", "a.mar"])
    assert wants_early_daemon(["serve", "start", "--ncs", "--models=a.mar,b.mar"])
    assert not wants_early_daemon(["serve", "start"])  # snapshots: nothing known to start
    assert not wants_early_daemon(["serve", "start", "--models", "a.mar", "--foreground"])
    assert not wants_early_daemon(["serve", "start", "--models", "a.mar", "-h"])
    assert not wants_early_daemon(["serve", "status", "--models"])
    assert not wants_early_daemon(["infer", "serve", "start", "--models"])
