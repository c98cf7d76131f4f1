"""Start-up and shutdown that hold whatever state the models and workers are in: a snapshot
entry that fails to load leaves the others served, the daemon can hold `max_connections`
(its open-file limit is raised), and `tsctl serve stop` drains, then stops, even with a worker
dead, or still running a handler after the drain."""

from __future__ import annotations

import os
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Server:
    srv = Server(tmp_path, properties={"drain_timeout": 1})
    make_archive(srv.store, "swiss", "swiss")
    return srv


def snapshot_kinds(server: Server) -> list[str]:
    folder = server.log_dir / "config"
    return [p.name.split("-", 1)[1] for p in sorted(folder.glob("*.cfg"))]


# --- a snapshot entry that fails to load


LEFT_OUT = r"not loaded from the snapshot .*: other"


@pytest.mark.daemon_errors(LEFT_OUT, r"cannot load the weights", required=False)
@pytest.mark.parametrize("fault", ["archive-gone", "handler-fails-to-load"])
def test_a_snapshot_entry_that_fails_leaves_the_others_served(server: Server, fault: str) -> None:
    make_archive(server.store, "other", "swiss")
    server.start("swiss.mar", "other.mar", ncs=False)
    server.stop()
    if fault == "archive-gone":
        (server.store / "other.mar").unlink()
    else:  # the same name and version, now with a handler that cannot load
        make_archive(server.store, "other", "broken")
    started = server.start(ncs=False)  # restores the shutdown snapshot
    assert "tsctl: warning: not loaded: other" in started.stderr, started.stderr
    try:
        assert server.predict("swiss", {}).status == 200
        listed = [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
        assert listed == ["swiss"]
        log = (server.log_dir / "ts_log.log").read_text()
        assert "not loaded from the snapshot" in log and "other" in log
    finally:
        server.stop()


# --- the open-file limit


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    """This process's (and so the daemon's) soft limit on open files, lowered below the hard
    one for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 512)
    if hard != resource.RLIM_INFINITY and lowered >= hard:
        pytest.skip("the hard limit is too low to lower the soft one under it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_daemon_raises_its_open_file_limit(server: Server, low_soft_limit: int) -> None:
    server.start()
    try:
        assert server.info is not None
        limits = Path(f"/proc/{server.info.pid}/limits").read_text()
        [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
        soft, hard = line.split()[3:5]
        assert soft == hard
        log = (server.log_dir / "ts_log.log").read_text()
        assert "raised the open-file limit from 512" in log
    finally:
        server.stop()


# --- stopping whatever state the workers are in


def _worker_pid(server: Server) -> int:
    [described] = server.manage("GET", "/models/swiss").json()
    pid: int = described["workers"][0]["pid"]
    return pid


def test_stop_with_a_worker_killed_while_idle(server: Server) -> None:
    server.start("swiss.mar", ncs=False)
    os.kill(_worker_pid(server), signal.SIGKILL)
    stopped = server.stop()
    assert "tsctl stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert snapshot_kinds(server)[-1] == "shutdown.cfg"


@pytest.mark.daemon_errors(r"died|killed|Connection reset", required=False)
def test_stop_kills_a_worker_still_busy_after_the_drain(server: Server, tmp_path: Path) -> None:
    server.start("swiss.mar", ncs=False)
    marker = tmp_path / "busy"
    answers: list[int] = []

    def forever() -> None:
        command = {"action": "sleep", "seconds": 3600, "marker": str(marker)}
        answers.append(server.predict("swiss", command, timeout=120).status)

    client = threading.Thread(target=forever)
    client.start()
    try:
        server.wait_for(marker.exists)  # the handler is running
        stopped = server.stop()  # drain_timeout is 1 s; the handler would run for an hour
    finally:
        client.join(timeout=120)
    assert "tsctl stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert snapshot_kinds(server)[-1] == "shutdown.cfg"  # a drain, not a SIGKILL
    assert answers and answers[0] >= 500  # the request got an answer, not a hang
    assert "killing worker" in (server.log_dir / "ts_log.log").read_text()


def _session_members(sid: int) -> list[int]:
    """Live processes (not zombies) of session `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def test_stop_leaves_no_worker_behind_even_one_still_loading(tmp_path: Path) -> None:
    server = Server(tmp_path, properties={"drain_timeout": 1, "enable_model_api": "true"})
    make_archive(server.store, "slowload", "slowload")
    marker = tmp_path / "loading"
    server.start(env={"SLOWLOAD_MARKER": str(marker)})
    assert server.info is not None
    daemon = server.info.pid
    registered = server.manage("POST", "/models?url=slowload.mar&synchronous=false")
    assert registered.status == 202, registered.body
    server.wait_for(marker.exists)  # a worker is loading the handler, for an hour
    stopped = server.stop()
    assert "tsctl stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    server.wait_for(lambda: _session_members(daemon) == [])
