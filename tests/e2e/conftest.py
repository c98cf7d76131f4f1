"""Fixtures shared by several end-to-end test modules.

`ts`: tsctl's `ts` package imported into the test process (TorchServe's default handlers, for
test_ts_*.py); `built`: tests/fixtures/ts_models/build.py's models, built once per session;
`compat`: `import ts` finds tsctl's package for one test (test_envelopes*.py).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.ts_handlers import COMPAT, MODEL_MODULES, TS_MODELS
from tsctl.worker.loader import install_compat_path


def _is_ts(name: str) -> bool:
    return name == "ts" or name.startswith("ts.")


@pytest.fixture(scope="module")
def ts() -> Iterator[Any]:
    """tsctl's `ts` modules, imported in this process; sys.path and sys.modules restored.

    Unit tests of the default handlers use it: tsctl/worker/compat goes first on `sys.path`
    (the real TorchServe `ts` is installed in the dev venv too)."""
    saved_path = list(sys.path)
    displaced = {name: module for name, module in sys.modules.items() if _is_ts(name)}
    for name in displaced:
        del sys.modules[name]
    sys.path.insert(0, str(COMPAT))
    try:
        yield SimpleNamespace(
            T=importlib.import_module("ts.torch_handler._transforms"),
            vision=importlib.import_module("ts.torch_handler.vision_handler"),
            classifier=importlib.import_module("ts.torch_handler.image_classifier"),
            detector=importlib.import_module("ts.torch_handler.object_detector"),
            segmenter=importlib.import_module("ts.torch_handler.image_segmenter"),
            text=importlib.import_module("ts.torch_handler.text_handler"),
            text_classifier=importlib.import_module("ts.torch_handler.text_classifier"),
            util=importlib.import_module("ts.utils.util"),
            per_request=importlib.import_module("ts.torch_handler._per_request"),
            micro=importlib.import_module("ts.handler_utils.micro_batching"),
        )
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if _is_ts(n) or n in MODEL_MODULES]:
            del sys.modules[name]
        sys.modules.update(displaced)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models of tests/fixtures/ts_models/build.py (run in a subprocess: it imports torch);
    once per session, for the in-process handler tests and the daemon that serves them."""
    out = tmp_path_factory.mktemp("ts_models")
    subprocess.run([sys.executable, str(TS_MODELS / "build.py"), str(out)], check=True)
    return out


@pytest.fixture
def compat() -> Iterator[None]:
    """`import ts` finds tsctl's package for the test; sys.path and sys.modules are restored."""
    saved_path = list(sys.path)
    saved = {n: m for n, m in sys.modules.items() if _is_ts(n)}
    install_compat_path()
    yield
    sys.path[:] = saved_path
    for name in [n for n in sys.modules if _is_ts(n)]:
        del sys.modules[name]
    sys.modules.update(saved)
