"""Shell completion: the committed scripts are current, and completing works without torch."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.test_cli import heavy_imports
from tests.support.cli import BIN
from tests.support.paths import ROOT

SCRIPTS = {"bash": "tsctl.bash", "zsh": "_tsctl", "fish": "tsctl.fish"}


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_committed_completion_script_is_current(shell: str) -> None:
    generated = subprocess.run(
        [str(BIN / "tsctl")],
        env={**os.environ, "_TSCTL_COMPLETE": f"source_{shell}"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "completions" / SCRIPTS[shell]).read_text()
    assert generated == committed, f"completions/{SCRIPTS[shell]} is stale: run `make completions`"


def bash_complete(words: str) -> tuple[list[str], str]:
    env = {
        **os.environ,
        "_TSCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    heavy, out = heavy_imports([], env=env)
    return out.split(), heavy


def test_completes_command_names_without_heavy_imports() -> None:
    words, heavy = bash_complete("tsctl arc")
    assert words == ["archive"]
    assert heavy == ""


def test_completes_archive_formats() -> None:
    words, _ = bash_complete("tsctl archive --archive-format t")
    assert words == ["tgz"]
    words, _ = bash_complete("tsctl archive inspect --j")
    assert words == ["--json"]
