"""Shared fixtures; every test fails when something logs an ERROR it did not expect."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails when anything logs at ERROR or above that it did not expect.

    A test that expects an error log clears it with `caplog.clear()` after asserting on it.
    """
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def tma() -> Path:
    """The reference torch-model-archiver 0.12 executable (a test dependency)."""
    exe = BIN / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency: run `make test`"
    return exe
