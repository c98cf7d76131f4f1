"""The reliability suite: real daemons under load, faults and hostile clients, each scenario
bounded in time and traffic (loopback only) and reporting its figures.

Run it with `pytest tests/reliability` (CI size) or `TSCTL_RELIABILITY_SCALE=full pytest
tests/reliability` (the sizes docs/reliability.md reports). Each scenario's figures are printed
at the end of the run (whether or not `-s` is given) and written as JSON to
`TSCTL_RELIABILITY_REPORT` or `reliability.json` in pytest's temporary base directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import reliability


def pytest_configure(config: pytest.Config) -> None:
    reliability.RESULTS.clear()


@pytest.fixture(scope="session", autouse=True)
def reliability_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(
        os.environ.get("TSCTL_RELIABILITY_REPORT")
        or tmp_path_factory.getbasetemp() / "reliability.json"
    )
    reliability.REPORT_PATH[:] = [path]
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not reliability.RESULTS:
        return
    terminalreporter.section("tsctl reliability figures")
    for entry in reliability.RESULTS:
        terminalreporter.write_line(json.dumps(entry))
    if reliability.REPORT_PATH:
        terminalreporter.write_line(f"written to {reliability.REPORT_PATH[0]}")
