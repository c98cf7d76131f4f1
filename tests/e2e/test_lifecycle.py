"""`tsctl serve start/stop/status` as a user runs them: real daemons, pid files, signals."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.errors import TsctlError
from tsctl.local import pidfile
from tsctl.local.launch import launch_daemon
from tsctl.server import boot
from tsctl.server.workers.spares import cpu_count

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Server:
    srv = Server(tmp_path / "one")
    make_archive(srv.store, "swiss", "swiss")
    return srv


def test_start_status_stop(server: Server) -> None:
    server.start("swiss.mar")
    status = server.tsctl("serve", "status", "--state-dir", server.state_dir, "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["running"] is True
    [model] = doc["models"]
    assert (model["modelName"], model["modelVersion"]) == ("swiss", "1.0")
    assert model["workers"][0]["status"] == "READY"
    worker_pid = model["workers"][0]["pid"]

    table = server.tsctl("serve", "status", "--state-dir", server.state_dir)
    assert "swiss" in table.stdout and str(worker_pid) in table.stdout

    # `torchserve --stop --foreground`: scripts stop and wait this way
    stopped = server.tsctl("serve", "stop", "--foreground")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not pidfile.pid_path(server.state_dir).exists()
    assert not Path(f"/proc/{worker_pid}").exists()  # the workers went with it

    again = server.stop()
    assert again.returncode == 0 and "not running" in again.stdout
    status = server.tsctl("serve", "status", "--state-dir", server.state_dir)
    assert status.returncode == 1 and "not running" in status.stdout


def test_stale_pid_file(server: Server) -> None:
    path = pidfile.pid_path(server.state_dir)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    record = pidfile.PidInfo(int(dead.stdout), 1, "http://127.0.0.1:1", "http://127.0.0.1:2", "")
    pidfile.write(path, record)
    stopped = server.stop()
    assert "stale pid file" in stopped.stdout and not path.exists()

    # a pid that now belongs to another program (this test process): never signalled
    pidfile.write(path, pidfile.PidInfo(os.getpid(), 1, "http://127.0.0.1:1", "http://x:2", ""))
    stopped = server.stop()
    assert "stale pid file" in stopped.stdout and not path.exists()

    pidfile.write(path, record)  # start goes ahead over a stale record
    server.start("swiss.mar")
    assert server.predict("swiss", {"action": "echo"}).status == 200
    server.stop()


def test_two_daemons_side_by_side(tmp_path: Path) -> None:
    servers = [Server(tmp_path / name) for name in ("a", "b")]
    for srv in servers:
        make_archive(srv.store, "swiss", "swiss")
        srv.start("swiss.mar")
    try:
        pids = {srv.predict("swiss", {}).json()["pid"] for srv in servers}
        assert len(pids) == 2
        servers[0].stop()
        assert servers[1].predict("swiss", {}).status == 200
    finally:
        for srv in servers:
            srv.stop()


def _started_here(root: Path) -> set[int]:
    """Processes whose working directory is `root`: the daemon, its workers, any spares."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(root):
                    found.add(int(entry.name))
            except OSError:
                pass  # gone, or not ours to read
    return found


def test_start_twice_is_refused(server: Server) -> None:
    server.start("swiss.mar")
    try:
        running = _started_here(server.root)
        again = server.start("swiss.mar", expect_ok=False)
        assert again.returncode == 1
        assert "already running" in again.stderr
        # the daemon launched early for the refused start, and its spare, go away
        server.wait_for(lambda: _started_here(server.root) == running)
    finally:
        server.stop()


def test_a_bad_flag_leaves_no_early_daemon_behind(server: Server) -> None:
    """`serve start --models` launches the daemon before parsing its flags (tsctl.cli.entry); a
    start that then fails on a flag must leave nothing running."""
    result = server.tsctl("serve", "start", "--models", "swiss.mar", "--no-such-flag")
    assert result.returncode == 2 and "--no-such-flag" in result.stderr
    server.wait_for(lambda: not _started_here(server.root))


@pytest.mark.daemon_errors(r"start-up failed: inference address 127\.0\.0\.1:\d+ is already in use")
def test_port_in_use(server: Server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server.properties["inference_address"] = f"http://127.0.0.1:{port}"
        result = server.start("swiss.mar", expect_ok=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"tsctl: error: inference address 127.0.0.1:{port} is already in use"
    )
    assert not pidfile.pid_path(server.state_dir).exists()


def test_bad_config_value(server: Server) -> None:
    server.properties["job_queue_size"] = "lots"
    result = server.start("swiss.mar", expect_ok=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "job_queue_size" in lines[0] and "lots" in lines[0]
    server.wait_for(lambda: not _started_here(server.root))  # nothing left behind


@pytest.mark.daemon_errors(r"RuntimeError: cannot load the weights: broken\.pt is missing")
def test_model_that_fails_to_load(server: Server) -> None:
    make_archive(server.store, "broken", "broken")
    result = server.start("broken.mar", expect_ok=False)
    assert result.returncode == 1
    assert "RuntimeError: cannot load the weights: broken.pt is missing" in result.stderr
    assert "Traceback" in result.stderr  # the model log's last lines follow the reason
    assert not pidfile.pid_path(server.state_dir).exists()


@pytest.mark.daemon_errors(r"start-up failed: Model not found at: nothere\.mar")
def test_missing_archive(server: Server) -> None:
    result = server.start("nothere.mar", expect_ok=False)
    assert result.returncode == 1
    assert "nothere.mar" in result.stderr


def test_stop_lets_in_flight_requests_finish(server: Server) -> None:
    server.start("swiss.mar")
    marker = server.root / "busy"
    answers: list[int] = []
    slow = threading.Thread(
        target=lambda: answers.append(
            server.predict("swiss", {"action": "sleep", "seconds": 1, "marker": str(marker)}).status
        )
    )
    slow.start()
    server.wait_for(marker.exists)
    stopped = server.stop()
    slow.join()
    assert stopped.returncode == 0
    assert answers == [200]


def test_foreground_and_sigterm(server: Server) -> None:
    server.store.mkdir(parents=True, exist_ok=True)
    config = server.root / "fg.properties"
    config.write_text(
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n"
        "metrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\ngrpc_oip_port=0\n"
        "default_workers_per_model=1\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tsctl",
            "serve",
            "start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--model-store",
            str(server.store),
            "--models",
            "swiss.mar",
            "--ts-config",
            str(config),
            "--state-dir",
            str(server.state_dir),
            "--log-dir",
            str(server.log_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Model server started" in line:
            break
    server.info = pidfile.read(pidfile.pid_path(server.state_dir))
    assert server.predict("swiss", {}).status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    proc.stdout.close()
    assert not pidfile.pid_path(server.state_dir).exists()


def test_ts_metrics_log_has_system_metrics(server: Server) -> None:
    server.start("swiss.mar")
    server.predict("swiss", {})
    server.stop()  # a final report is written at stop
    text = (server.log_dir / "ts_metrics.log").read_text()
    for name in ("CPUUtilization.Percent:", "MemoryUsed.Megabytes:", "DiskAvailable.Gigabytes:",
                 "Requests2XX.Count:1.0|#Level:Host|#hostname:"):  # fmt: skip
        assert name in text, name


def test_start_up_workers_share_the_cores_evenly(server: Server) -> None:
    """Models load one after another, yet the first one's worker must not take every core."""
    make_archive(server.store, "second", "swiss")
    server.start("swiss.mar", "second.mar")
    try:
        expected = str(max(1, cpu_count() // 2))
        threads = [
            server.predict(m, {"action": "echo"}).json()["threads"] for m in ("swiss", "second")
        ]
        assert threads == [expected, expected]
    finally:
        server.stop()


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def test_serve_start_imports_nothing_heavy(server: Server) -> None:
    """`tsctl serve start` shares two cores with the worker importing torch: the CLI itself
    must not import the daemon's modules (tornado, the registry, the worker pool) or torch."""
    make_archive(server.store, "light", "swiss", config={"minWorkers": 1, "maxWorkers": 1})
    result = server.start("light.mar", env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line
        }
        assert "tsctl.cli.app" in imported  # the check sees the CLI's imports
        heavy = {"torch", "tornado", "grpc", "tsctl.server.daemon", "tsctl.server.registry"}
        assert not heavy & imported, heavy & imported
    finally:
        server.stop()


def test_start_up_workers_are_started_ahead(server: Server) -> None:
    """The daemon starts the workers its start-up models will need before its own imports (they
    import torch meanwhile); the model takes one, and the spare it did not need is stopped."""
    server.properties["default_workers_per_model"] = 2  # two spares on a machine of 2+ cores
    make_archive(server.store, "one", "swiss", config={"minWorkers": 1, "maxWorkers": 1})
    server.start("one.mar")
    try:
        doc = json.loads(server.tsctl("serve", "status", "--json").stdout)
        [model] = doc["models"]
        [worker] = model["workers"]
        command = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"--preload" in command  # a spare, taken over
        assert server.info is not None
        assert _children(server.info.pid) == {worker["pid"]}  # no spare left behind
        answer = server.predict("one", {"action": "echo"}).json()
        assert answer["pid"] == worker["pid"] and answer["threads"] == str(cpu_count())
    finally:
        server.stop()


def test_a_failed_fork_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of processes cannot be caused for real here (root is exempt from
    RLIMIT_NPROC), so `os.fork` fails as the kernel would make it fail."""

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", no_fork)
    open_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(TsctlError, match="cannot start the server process: Resource temp"):
        launch_daemon(boot.main, early_spares=0)
    assert set(os.listdir("/proc/self/fd")) == open_before  # its pipes are closed again
