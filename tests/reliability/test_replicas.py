"""Several replicas on one machine behind a real load balancer: tsctl daemons behind nginx
(tests/support/nginx.py: keep-alive to the replicas, a request that fails or is answered
502/503 retried on another one) take steady keep-alive load from a few client threads.

Replicas A and B serve; C is a standby (nginx's `backup`: sent requests only while A and B
both fail). Mid-load, A is stopped with SIGTERM: it drains (stops accepting, closes its idle
connections, answers what it holds with `Connection: close`) while B takes the load: no client
request may fail, and A refuses none with 503. Then B's daemon is SIGKILLed: at most the
requests B held at that moment may fail (one per client thread), and C takes the load on.
The figures (sent, answered, failed and who answered, per phase; what nginx retried on another
replica) are reported; docs/reliability.md has the last run's.

Why a standby rather than A restarted on its port: a restarting daemon listens before its
start-up models are registered, and answers a prediction in that window 404 (model not
found), which nginx rightly does not retry. A load balancer that routes to a replica only once
it is ready (Kubernetes' endpoints) never sees that; a static nginx upstream list does.

Skipped, with the reason, where nginx is not installed (`apt-get install -y nginx`: README).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import nginx
from tests.support import reliability as rel
from tests.support.daemon import Server, make_archive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        nginx.binary() is None,
        reason="nginx is not installed (Debian/Ubuntu: apt-get install -y nginx; see README)",
    ),
]

CLIENTS = 4
#: each client's pause between requests: a few hundred requests/s in all, at most
PAUSE = 0.01
#: answers a replica must have given (since a moment) before the test moves on
ANSWERS = int(rel.sized(300, 3000))
#: the readiness waits' bound (never reached on a working setup)
WAIT = 60.0
REQUEST = rel.post("/predictions/swiss", b'{"action": "echo"}')


@dataclass(frozen=True)
class Record:
    """One request through nginx, as its client saw it."""

    started: float
    ended: float
    status: int | None
    failure: str | None
    upstreams: str  # nginx's $upstream_addr: the replicas tried, in order
    upstream_statuses: str  # nginx's $upstream_status

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def retried(self) -> bool:
        return "," in self.upstreams


class Clients:
    """`CLIENTS` threads sending predictions through nginx on keep-alive connections (a new
    one after a failure), each answer recorded with its time (a context manager)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        conn: rel.Connection | None = None
        while not self.stopping.is_set():
            started = time.monotonic()
            status: int | None = None
            failure: str | None = None
            headers: dict[str, str] = {}
            try:
                if conn is None or not conn.open:
                    conn = rel.Connection(self.address, timeout=WAIT)
                status, headers, _ = conn.request(REQUEST)
            except TimeoutError:
                failure = "timeout"
            except (rel.Closed, ConnectionError) as exc:
                failure = type(exc).__name__
            except OSError as exc:
                failure = f"OSError {exc.errno}"
            record = Record(
                started,
                time.monotonic(),
                status,
                failure,
                headers.get("x-upstream", ""),
                headers.get("x-upstream-status", ""),
            )
            with self.lock:
                self.records.append(record)
            if failure is not None and conn is not None:
                conn.close()
                conn = None
            time.sleep(PAUSE)
        if conn is not None:
            conn.close()

    def answered_by(self, upstream: str, since: float) -> int:
        """200s that `upstream` gave (last in `X-Upstream`) to requests sent after `since`."""
        with self.lock:
            return sum(
                1
                for r in self.records
                if r.ok and r.started >= since and r.upstreams.split(", ")[-1] == upstream
            )

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(WAIT + 5)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def figures(records: list[Record]) -> dict[str, Any]:
    statuses = Counter(str(r.status) for r in records if r.status is not None)
    return {
        "sent": len(records),
        "answered": sum(1 for r in records if r.status is not None),
        "failed": sum(1 for r in records if not r.ok),
        "statuses": dict(sorted(statuses.items())),
        "no_answer": dict(Counter(r.failure for r in records if r.failure is not None)),
        "retried_by_nginx": sum(1 for r in records if r.retried),
        "upstream_statuses_of_retried": dict(
            Counter(r.upstream_statuses for r in records if r.retried)
        ),
    }


def upstream(srv: Server) -> str:
    return srv.inference.removeprefix("http://")


def wait_exit(pid: int) -> None:
    deadline = time.monotonic() + WAIT
    while rel.alive(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit in time"
        time.sleep(0.02)


def wait_answers(clients: Clients, srv: Server, since: float) -> None:
    """Until `srv` has answered `ANSWERS` requests sent after `since` (through nginx)."""
    srv.wait_for(lambda: clients.answered_by(upstream(srv), since) >= ANSWERS, timeout=WAIT)


def who(records: list[Record], servers: dict[str, Server]) -> dict[str, int]:
    """200s per replica (the last one nginx tried answered)."""
    names = {upstream(srv): name for name, srv in servers.items()}
    found = Counter(names.get(r.upstreams.split(", ")[-1], "?") for r in records if r.ok)
    return dict(sorted(found.items()))


@pytest.mark.daemon_errors(r"(?i)worker|died|exit|signal|closed", required=False)
def test_replicas_behind_nginx(tmp_path: Path) -> None:
    config = {"default_workers_per_model": 1, "default_response_timeout": 20}
    servers = {name: Server(tmp_path / name, dict(config)) for name in ("a", "b", "c")}
    for srv in servers.values():
        make_archive(srv.store, "swiss", "swiss")
        srv.start("swiss.mar")
    a, b, c = servers.values()
    pids = {name: srv.info.pid for name, srv in servers.items() if srv.info is not None}
    proxy = nginx.Nginx(tmp_path / "nginx", [upstream(a), upstream(b)], [upstream(c)])
    try:
        with proxy, Clients(proxy.address) as clients:
            t0 = time.monotonic()
            wait_answers(clients, a, t0)
            wait_answers(clients, b, t0)

            # SIGTERM: A drains while the load goes on; B takes it all
            t_term = time.monotonic()
            os.kill(pids["a"], signal.SIGTERM)
            wait_exit(pids["a"])
            t_gone = time.monotonic()
            wait_answers(clients, b, t_gone)

            # SIGKILL: B's daemon dies with what it holds; the standby C takes the load on
            t_kill = time.monotonic()
            os.kill(pids["b"], signal.SIGKILL)
            wait_exit(pids["b"])
            wait_answers(clients, c, t_kill)
            clients.stop()
            t_end = time.monotonic()
    finally:
        proxy.stop()
        for name, srv in servers.items():
            if rel.alive(pids[name]):
                srv.stop()
            if rel.alive(pids[name]):
                os.kill(pids[name], signal.SIGKILL)

    records = sorted(clients.records, key=lambda r: r.ended)
    # a request belongs to the phase in which it ended: one in flight on B when B was killed
    # ended (failed or retried) after the kill
    phases = {
        "before": [r for r in records if r.ended < t_term],
        "sigterm": [r for r in records if t_term <= r.ended < t_kill],
        "sigkill": [r for r in records if r.ended >= t_kill],
    }
    # what nginx logged about the replicas, by kind ("connect() failed (111: ...)", ...)
    errors = Counter(
        re.sub(r"^.*?\*\d+ | while .*$", "", line)
        for line in proxy.error_log().splitlines()
        if "[error]" in line
    )
    rel.report(
        "replicas behind nginx",
        {
            "clients": CLIENTS,
            "duration_s": round(t_end - t0, 1),
            "drain_s": round(t_gone - t_term, 2),
            **{
                name: {**figures(part), "answered_by": who(part, servers)}
                for name, part in phases.items()
            },
            "nginx_errors": dict(errors),
        },
    )
    before, term, kill = phases.values()
    assert before and term and kill
    assert all(r.ok for r in before), figures(before)
    # the drain loses nothing, and refuses nothing: no request reached A to be answered 503
    # (a proxy that does not retry 503s, such as a Kubernetes Service, would pass it on)
    assert all(r.ok for r in term), figures(term)
    assert not [r for r in term if "503" in r.upstream_statuses], figures(term)
    failed = [r for r in kill if not r.ok]
    # at most what B held when it died: one request per client thread
    assert len(failed) <= CLIENTS, figures(kill)
    assert all(r.status in (None, 200, 502, 504) for r in failed), figures(kill)
