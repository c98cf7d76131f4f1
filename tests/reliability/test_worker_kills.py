"""Workers killed under load: steady keep-alive traffic to a two-worker model while one of its
workers is SIGKILLed every few seconds (30 s in CI, 2 minutes at full scale).

Every request gets an answer, a success or a clear 5xx (none is lost, none passes its
deadline); after each kill the model is whole again (describe shows every worker READY, the
killed one replaced); and the client's counts reconcile with the metrics API: its 200s with
`ts_inference_requests_total`, its kills with `tsctl_worker_restarts_total`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import reliability as rel
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

DURATION = rel.sized(30, 120)
KILL_EVERY = 3.0
CLIENTS = 3
DEADLINE = 15.0
RECOVERY = 30.0


def workers(srv: Server) -> list[dict[str, Any]]:
    described = srv.manage("GET", "/models/swiss").json()
    return list(described[0]["workers"])


def recovered(srv: Server, killed: int, count: int) -> bool:
    now = workers(srv)
    return (
        len(now) == count
        and all(w["status"] == "READY" for w in now)
        and killed not in [w["pid"] for w in now]
    )


@pytest.mark.daemon_errors(r"(?i)worker|died|exit|signal", required=False)
def test_workers_killed_under_load(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"default_workers_per_model": 2, "default_response_timeout": 10})
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar")
    assert srv.info is not None
    metrics = srv.info.metrics_address
    try:
        before = rel.scrape(metrics)
        kills: list[float] = []
        request = rel.post("/predictions/swiss", b'{"action": "echo"}')
        with (
            rel.Sampler(srv.info.pid) as sampler,
            rel.Load(srv.inference, request, clients=CLIENTS, deadline=DEADLINE) as load,
        ):
            end = time.monotonic() + DURATION
            while time.monotonic() < end:
                time.sleep(KILL_EVERY)
                ready = [w for w in workers(srv) if w["status"] == "READY"]
                assert ready, workers(srv)
                victim = int(ready[0]["pid"])
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                srv.wait_for(lambda v=victim: recovered(srv, v, 2), timeout=RECOVERY)
                kills.append(time.monotonic() - killed_at)
            load.stop()
        after = rel.scrape(metrics)
    finally:
        stop(srv)
    out = load.outcomes
    figures = out.figures()
    served = rel.total(after, "ts_inference_requests_total", model_name="swiss") - rel.total(
        before, "ts_inference_requests_total", model_name="swiss"
    )
    restarts = rel.total(after, "tsctl_worker_restarts_total", model_name="swiss") - rel.total(
        before, "tsctl_worker_restarts_total", model_name="swiss"
    )
    rel.report(
        "workers killed under load",
        {
            "duration_s": DURATION,
            "clients": CLIENTS,
            **figures,
            "kills": len(kills),
            "restarts_metric": restarts,
            "recovery_s": [round(k, 2) for k in kills],
            "metrics_200": served,
            "daemon": sampler.figures(),
        },
    )
    assert kills, "no worker was killed"
    assert figures["lost"] == 0, figures["failures"]
    assert not out.failures, out.failures
    assert max(out.latencies) < DEADLINE * 1000
    assert all(s == 200 or 500 <= s <= 599 for s in out.statuses), out.statuses
    assert out.statuses[200] > 0
    assert served == out.statuses[200]
    assert restarts == len(kills)


def stop(srv: Server) -> None:
    """`serve stop`, then make sure nothing of the daemon is left."""
    assert srv.info is not None
    pid = srv.info.pid
    srv.stop()
    if rel.alive(pid):
        os.kill(pid, signal.SIGKILL)
