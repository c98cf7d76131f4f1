"""The pid file is trusted only when nobody else could have written it: a per-user state
directory by default (mode 0700), planted files and directories refused with one line naming
them, and a record never trusted without its process's start time.

The planted records name a real process this test starts (the "victim"): `tsctl serve stop`
must never signal it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_tsctl
from tests.support.daemon_logs import WATCHED
from tsctl.local import pidfile

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="planting another user's file needs root")


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this user that a planted record names."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    yield proc
    proc.kill()
    proc.wait()
    assert proc.stdin is not None
    proc.stdin.close()


def plant(state_dir: Path, pid: int, start_ticks: int | None, **more: str) -> Path:
    """A pid file as someone else could write it (mode 0600 here; tests loosen it)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = pidfile.pid_path(state_dir)
    record = {
        "pid": pid,
        "start_ticks": start_ticks,
        "inference_address": "http://127.0.0.1:1",
        "management_address": "http://127.0.0.1:1",
        "log_dir": "",
        **more,
    }
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    return path


def stop(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_tsctl("serve", "stop", "--state-dir", state_dir, "--timeout", "1")


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


# --- planted files and directories are refused


def test_pid_file_others_may_write_is_refused(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    path = plant(tmp_path / "state", victim.pid, pidfile.process_start_ticks(victim.pid))
    path.chmod(0o666)
    for args in (("stop",), ("status",)):
        result = run_tsctl("serve", *args, "--state-dir", tmp_path / "state")
        assert_user_error(result, str(path), "others may write it")
    assert alive(victim) and path.exists()


@as_root
def test_pid_file_of_another_user_is_refused(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    path = plant(tmp_path / "state", victim.pid, pidfile.process_start_ticks(victim.pid))
    os.chown(path, NOBODY, NOBODY)
    assert_user_error(stop(tmp_path / "state"), str(path), "another user")
    assert alive(victim)


@pytest.mark.parametrize("owner", ["others-may-write", "another-user"])
def test_unsafe_state_dir_is_refused(
    tmp_path: Path, victim: subprocess.Popen[bytes], owner: str
) -> None:
    state = tmp_path / "state"
    plant(state, victim.pid, pidfile.process_start_ticks(victim.pid))
    if owner == "others-may-write":
        state.chmod(0o777)
        needle = "others may write in it"
    else:
        if os.getuid() != 0:
            pytest.skip("planting another user's directory needs root")
        os.chown(state, NOBODY, NOBODY)
        needle = "another user"
    assert_user_error(stop(state), f"state directory {state}", needle)
    assert alive(victim)
    started = run_tsctl("serve", "start", "--dt", "--ncs", "--state-dir", state)
    assert_user_error(started, f"state directory {state}", needle)


def test_world_writable_sticky_dir_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # like /tmp: others may write, but not replace our files
    shared.mkdir()
    shared.chmod(0o1777)
    assert stop(shared).stdout.strip() == "tsctl is not running."


def test_symlinked_pid_file_is_refused(tmp_path: Path, victim: subprocess.Popen[bytes]) -> None:
    elsewhere = plant(tmp_path / "elsewhere", victim.pid, pidfile.process_start_ticks(victim.pid))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    pidfile.pid_path(state).symlink_to(elsewhere)
    assert_user_error(stop(state), str(pidfile.pid_path(state)))
    assert alive(victim)


# --- a record is trusted only with the start time of the process it names


@pytest.mark.parametrize("ticks", [None, 1], ids=["no-start-time", "another-process"])
def test_record_without_its_process_start_time_is_stale(
    tmp_path: Path, victim: subprocess.Popen[bytes], ticks: int | None
) -> None:
    path = plant(tmp_path / "state", victim.pid, ticks)
    stopped = stop(tmp_path / "state")
    assert stopped.returncode == 0, stopped.stderr
    assert "stale pid file" in stopped.stdout
    assert alive(victim) and not path.exists()


def test_keys_never_go_to_an_untrusted_record(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    """A record without a start time names the attacker's address and a key file: the CLI
    does not send the key there, asked for that address or not."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    reached: list[bytes] = []
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{"models": []}'

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by the test
            with conn:
                reached.append(conn.recv(65536))
                conn.sendall(answer)

    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"management": {"key": "victims-key"}}))
    keys.chmod(0o600)
    plant(tmp_path / "state", victim.pid, None, management_address=address, key_file=str(keys))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        env = {"TSCTL_STATE_DIR": str(tmp_path / "state")}
        listed = run_tsctl("models", "list", "--url", address, env=env)
        assert listed.returncode == 0, listed.stderr
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        listener.close()
        thread.join()
    assert reached and all(b"victims-key" not in data for data in reached)


# --- the default state directory: per user, private


def _start_without_state_dir(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = root / "config.properties"
    config.write_text(
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n"
        "metrics_address=http://127.0.0.1:0\nenable_grpc=false\n"
    )
    args = ["serve", "start", "--ncs", "--dt", "--ts-config", config, "--log-dir", root / "logs"]
    return run_tsctl(*args, cwd=root, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["XDG_RUNTIME_DIR", "HOME"])
def test_default_state_dir_is_private_and_per_user(tmp_path: Path, where: str) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    if where == "XDG_RUNTIME_DIR":
        env = {"TSCTL_STATE_DIR": "", "XDG_RUNTIME_DIR": str(runtime)}
        state = runtime / "tsctl"
    else:
        home = tmp_path / "home"
        env = {"TSCTL_STATE_DIR": "", "XDG_RUNTIME_DIR": "", "XDG_STATE_HOME": "",
               "HOME": str(home)}  # fmt: skip
        state = home / ".local" / "state" / "tsctl"
    WATCHED.watch(tmp_path / "logs", pidfile.pid_path(state))
    started = _start_without_state_dir(tmp_path, env)
    assert started.returncode == 0, started.stderr
    try:
        path = pidfile.pid_path(state)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        status = run_tsctl("serve", "status", "--json", env=env)
        assert json.loads(status.stdout)["running"] is True
        again = _start_without_state_dir(tmp_path, env)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stopped = run_tsctl("serve", "stop", env=env)
    assert stopped.returncode == 0 and "tsctl stopped" in stopped.stdout, stopped.stderr
    assert not pidfile.pid_path(state).exists()
