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
from tsctl.server.workers.spares import GOMP_SPINCOUNT

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
