"""What a worker process runs torch with: its intra-op threads and OpenMP's idle wait.

The handler (tests/fixtures/handlers/threads_report.py) answers with the worker's own
`os.environ` and `torch.get_num_threads()`, so these check the process itself, spares
(started before their model is known, importing torch early) included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.server.workers.spares import GOMP_SPINCOUNT, cpu_count
from tsctl.worker.threads import SAMPLES, WARMUP

_OPERATOR_SET = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)


def _report(server: Server) -> dict[str, Any]:
    response = server.predict("threads", b"{}")
    assert response.status == 200, response.body
    report: dict[str, Any] = json.loads(response.body)
    return report


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, properties={"worker_threads": 1})
    make_archive(srv.store, "threads", "threads_report")
    yield srv
    srv.stop()


@pytest.mark.skipif(bool(_OPERATOR_SET), reason=f"the environment sets {_OPERATOR_SET}")
def test_workers_spin_briefly_by_default(server: Server) -> None:
    server.start("threads.mar")
    report = _report(server)
    # libgomp's spin before an idle torch thread sleeps: short, so the daemon gets the core
    assert report["GOMP_SPINCOUNT"] == GOMP_SPINCOUNT
    assert report["OMP_WAIT_POLICY"] is None
    assert report["torch_threads"] == 1
    assert report["OMP_NUM_THREADS"] == report["MKL_NUM_THREADS"] == "1"


def test_the_operators_wait_policy_wins(server: Server) -> None:
    server.start("threads.mar", env={"OMP_WAIT_POLICY": "PASSIVE"})
    report = _report(server)
    assert report["OMP_WAIT_POLICY"] == "PASSIVE"
    assert report["GOMP_SPINCOUNT"] == os.environ.get("GOMP_SPINCOUNT")  # none added
    assert report["torch_threads"] == 1


def _serve_and_report(server: Server, requests: int) -> dict[str, Any]:
    for _ in range(requests):
        report = _report(server)
    return report


@pytest.mark.skipif(cpu_count() < 2, reason="one core: a worker gets one thread, not tuned")
def test_threads_that_buy_nothing_are_given_back(tmp_path: Path) -> None:
    server = Server(tmp_path)  # worker_threads 0: the cores shared, tuned while serving
    make_archive(server.store, "threads", "threads_report")
    server.start("threads.mar")
    try:
        first = _report(server)
        assert first["torch_threads"] == cpu_count()
        # each halving takes 2 * SAMPLES batches after the warm-up: on many cores, several
        for _ in range(WARMUP + 2 * SAMPLES * cpu_count().bit_length()):
            if "torch threads tuned to" in server.model_log():
                break
            _report(server)
        server.wait_for(lambda: "torch threads tuned to" in server.model_log())
        assert _report(server)["torch_threads"] < cpu_count()
    finally:
        server.stop()


@pytest.mark.skipif(cpu_count() < 2, reason="one core: nothing to compare")
def test_threads_the_operator_set_are_kept(tmp_path: Path) -> None:
    server = Server(tmp_path, properties={"worker_threads": 2})
    make_archive(server.store, "threads", "threads_report")
    server.start("threads.mar")
    try:
        report = _serve_and_report(server, WARMUP + 4 * SAMPLES)
        assert report["torch_threads"] == 2
        assert "torch threads tuned" not in server.model_log()
    finally:
        server.stop()
