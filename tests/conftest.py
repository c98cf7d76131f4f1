"""Shared fixtures; every test fails when something logs an ERROR it did not expect."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from collections.abc import Generator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.cli import BIN
from tests.support.daemon_logs import WATCHED, Expected

#: whether a test's call passed (a test that failed or skipped need not log what it declared)
CALL_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[CALL_PASSED] = report.passed
    return report


def expected_daemon_errors(node: pytest.Item | pytest.Collector, required: bool) -> Expected:
    """The daemon errors `node` declares with `@pytest.mark.daemon_errors(*patterns)`; unless
    `required`, none of them needs to have been logged."""
    expected = Expected()
    for mark in node.iter_markers("daemon_errors"):
        expected.add(mark.args, required=required and mark.kwargs.get("required", True))
    return expected


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """A test fails when anything logs at ERROR or above that it did not expect: in this
    process, or in the logs of a daemon it started or used (`ts_log.log`, `model_log.log`;
    tests/support/daemon_logs.py).

    A test that expects an error log in this process clears it with `caplog.clear()` after
    asserting on it; one that makes a daemon log an error declares it with
    `@pytest.mark.daemon_errors(pattern, ...)`.
    """
    caplog.set_level(logging.WARNING)
    yield
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    try:
        passed = request.node.stash.get(CALL_PASSED, False)
        WATCHED.check(expected_daemon_errors(request.node, required=passed))
    finally:
        assert not errors, errors


@pytest.fixture(scope="module", autouse=True)
def no_unexpected_daemon_errors_at_module_end(request: pytest.FixtureRequest) -> Iterator[None]:
    """What the module's own daemons log while they stop (after its last test) is checked too,
    against the module's `daemon_errors` marks (`pytestmark`)."""
    yield
    WATCHED.check(expected_daemon_errors(request.node, required=False))


@pytest.fixture
def tma() -> Path:
    """The reference torch-model-archiver 0.12 executable (a test dependency)."""
    exe = BIN / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency: run `make test`"
    return exe


@pytest.fixture(scope="session")
def ts_protos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    """inference_pb2(_grpc) and management_pb2(_grpc), generated from torchserve's jar: a
    client as TorchServe users have it. Once per session: tsctl's own generated modules hold
    the same message names, so tests use these, never `tsctl.proto_gen`'s."""
    import google.rpc
    import grpc_tools

    # both register the same message names in protobuf's default pool: a test module that
    # imports tsctl's gRPC API (or its generated modules) at collection breaks this fixture
    early = [
        m
        for m in ("tsctl.proto_gen.inference_pb2", "tsctl.proto_gen.management_pb2")
        if m in sys.modules
    ]
    assert not early, f"{early} imported in the test process: import what needs it lazily"

    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.submodule_search_locations
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    out = tmp_path_factory.mktemp("ts_protos")
    with zipfile.ZipFile(jar) as zf:
        for name in ("inference.proto", "management.proto"):
            (out / name).write_bytes(zf.read(f"proto/{name}"))
    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{out}",
         f"-I{Path(grpc_tools.__file__).parent / '_proto'}", f"-I{googleapis}",
         f"--python_out={out}", f"--grpc_python_out={out}", "inference.proto", "management.proto"],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        return {
            name: importlib.import_module(name)
            for name in (
                "inference_pb2",
                "inference_pb2_grpc",
                "management_pb2",
                "management_pb2_grpc",
            )
        }
    finally:
        sys.path.remove(str(out))
