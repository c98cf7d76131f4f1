"""Daemon killed mid-change: SIGKILL the daemon while it registers a model version, scales a
model or changes its default version, again and again (9 times in CI, 30 at full scale); each
time the next start restores a snapshot that loads (every worker READY) and matches a state the
daemon had, the one before the change or the one after it (the one after it when the change
was answered 200: an acknowledged change is never lost).

The kill comes at a random moment (a seeded generator, so a run can be repeated) in the first
quarter second of the change, while the management request is in flight. The workers of the
killed daemon must go away by themselves (their socket to the daemon closes).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import reliability as rel
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

ROUNDS = int(rel.sized(9, 30))
#: the kill comes this long after the request is sent, at most
WITHIN = 0.25
#: how long a killed daemon's workers may take to exit
ORPHAN_GRACE = 10.0

State = dict[str, tuple[Any, ...]]


def state(srv: Server) -> State:
    """What a snapshot restores: each version of `swiss` with its worker count, and the
    default version."""
    described = srv.manage("GET", "/models/swiss/all").json()
    default = srv.manage("GET", "/models/swiss").json()[0]["modelVersion"]
    versions = tuple(sorted((d["modelVersion"], d["minWorkers"]) for d in described))
    return {"versions": versions, "default": (default,)}


def loaded(srv: Server) -> bool:
    described = srv.manage("GET", "/models/swiss/all").json()
    return all(
        len(d["workers"]) == d["minWorkers"] and all(w["status"] == "READY" for w in d["workers"])
        for d in described
    )


def worker_pids(srv: Server) -> list[int]:
    described = srv.manage("GET", "/models/swiss/all").json()
    return [int(w["pid"]) for d in described for w in d["workers"]]


def change(before: State, round_: int) -> tuple[str, str, State]:
    """The next change (method and path), and the state it leads to."""
    versions = dict(before["versions"])
    default = before["default"][0]
    kind = ("register", "set-default", "scale")[round_ % 3]
    if kind == "register":
        if "2.0" in versions:  # then unregister it, to register it again next time
            if default == "2.0":
                return change(before, 1)  # move the default back first
            if round_ % 2:
                return change(before, 1)  # or change it again
            del versions["2.0"]
            return (
                "DELETE",
                "/models/swiss/2.0",
                {**before, "versions": tuple(sorted(versions.items()))},
            )
        versions["2.0"] = 1
        after = {**before, "versions": tuple(sorted(versions.items()))}
        return "POST", "/models?url=swiss-v2.mar&synchronous=true", after
    if kind == "scale":
        count = 2 if versions[default] == 1 else 1
        versions[default] = count
        after = {**before, "versions": tuple(sorted(versions.items()))}
        return "PUT", f"/models/swiss/{default}?min_worker={count}&synchronous=true", after
    other = next((v for v in versions if v != default), None)
    if other is None:
        return change(before, 0)  # register a second version first
    return "PUT", f"/models/swiss/{other}/set-default", {**before, "default": (other,)}


def test_daemon_killed_mid_change(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss", version="2.0")
    shutil.move(srv.store / "swiss.mar", srv.store / "swiss-v2.mar")
    make_archive(srv.store, "swiss", "swiss", version="1.0")
    rng = random.Random(13)
    rounds: list[dict[str, Any]] = []
    orphans = 0
    srv.start("swiss.mar", ncs=False)
    try:
        for round_ in range(ROUNDS):
            assert srv.info is not None
            srv.wait_for(lambda: loaded(srv))
            before = state(srv)
            method, path, after = change(before, round_)
            pids = worker_pids(srv)
            delay = rng.uniform(0, WITHIN)
            answer: list[Any] = []
            sender = threading.Thread(
                target=lambda m=method, p=path, a=answer: a.append(_try(srv, m, p)), daemon=True
            )
            sender.start()
            time.sleep(delay)
            os.kill(srv.info.pid, signal.SIGKILL)
            sender.join(30)
            deadline = time.monotonic() + ORPHAN_GRACE
            while any(rel.alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:
                if rel.alive(pid):
                    orphans += 1
                    os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            srv.start(ncs=False)
            srv.wait_for(lambda: loaded(srv))
            restored = state(srv)
            rounds.append(
                {
                    "change": f"{method} {path.split('?')[0]}",
                    "kill_after_ms": round(delay * 1000),
                    "answered": answer[0] if answer else None,
                    "restored": "after"
                    if restored == after
                    else "before"
                    if restored == before
                    else "neither",
                    "restart_s": round(time.monotonic() - started, 2),
                }
            )
            assert restored in (before, after), (before, after, restored)
            if answer and answer[0] == 200:  # an acknowledged change is never lost
                assert restored == after, (before, after, restored)
    finally:
        assert srv.info is not None
        pid = srv.info.pid
        srv.stop()
        if rel.alive(pid):
            os.kill(pid, signal.SIGKILL)
        rel.report(
            "daemon killed mid-change",
            {
                "rounds": len(rounds),
                "restored_before": sum(r["restored"] == "before" for r in rounds),
                "restored_after": sum(r["restored"] == "after" for r in rounds),
                "orphan_workers": orphans,
                "detail": rounds,
            },
        )
    assert orphans == 0


def _try(srv: Server, method: str, path: str) -> int | str:
    try:
        return srv.manage(method, path, timeout=30).status
    except OSError as exc:
        return type(exc).__name__
