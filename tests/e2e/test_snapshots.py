"""Config snapshots: written after every change, restored at start, robust to SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.local import pidfile

pytestmark = pytest.mark.slow


def snapshots(server: Server) -> list[Path]:
    folder = server.log_dir / "config"
    return sorted(folder.glob("*.cfg")) if folder.exists() else []


def models(server: Server) -> dict[str, list[str]]:
    found = {}
    for entry in server.manage("GET", "/models").json()["models"]:
        described = server.manage("GET", f"/models/{entry['modelName']}/all").json()
        found[entry["modelName"]] = sorted(m["modelVersion"] for m in described)
    return found


@pytest.fixture
def server(tmp_path: Path) -> Server:
    srv = Server(tmp_path, properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "swiss2", "swiss", version="2.0")
    make_archive(srv.store, "other", "swiss")
    return srv


def test_restore_after_stop(server: Server) -> None:
    server.start("swiss.mar", ncs=False)
    assert [p.name.split("-", 1)[1] for p in snapshots(server)] == ["startup.cfg"]
    server.manage("POST", "/models?url=swiss2.mar&model_name=swiss")
    server.manage("PUT", "/models/swiss/2.0/set-default")
    server.manage("POST", "/models?url=other.mar")
    server.manage("PUT", "/models/other?min_worker=2&synchronous=true")
    server.stop()
    kinds = [p.name.split("-", 1)[1] for p in snapshots(server)]
    assert kinds[0] == "startup.cfg" and kinds[-1] == "shutdown.cfg" and "snapshot.cfg" in kinds

    server.start(ncs=False)  # no --models: the newest snapshot says what to load
    try:
        assert models(server) == {"other": ["1.0"], "swiss": ["1.0", "2.0"]}
        assert server.predict("swiss", {}).json()["version"] == "2.0"  # the default survived
        assert len(server.manage("GET", "/models/other").json()[0]["workers"]) == 2
    finally:
        server.stop()


def test_ncs_neither_restores_nor_writes(server: Server) -> None:
    server.start("swiss.mar", ncs=False)
    server.stop()
    before = snapshots(server)
    server.start()  # --ncs
    try:
        assert models(server) == {}
    finally:
        server.stop()
    assert snapshots(server) == before


@pytest.mark.daemon_errors(r"skipping config snapshot \S+: model_snapshot is malformed")
def test_corrupt_newest_snapshot_is_skipped(server: Server) -> None:
    server.start("swiss.mar", ncs=False)
    server.stop()
    newest = snapshots(server)[-1]
    broken = newest.with_name("99999999999999999-snapshot.cfg")
    broken.write_text("model_snapshot={not json\n")
    server.start(ncs=False)
    try:
        assert models(server) == {"swiss": ["1.0"]}
        log = (server.log_dir / "ts_log.log").read_text()
        assert f"skipping config snapshot {broken}" in log
    finally:
        server.stop()


def test_sigkill_leaves_a_loadable_snapshot(server: Server) -> None:
    server.start("swiss.mar", ncs=False)
    for i in range(5):  # changes right up to the kill
        server.manage("PUT", f"/models/swiss?min_worker={1 + i % 2}&synchronous=true")
    assert server.info is not None
    os.killpg(server.info.pid, signal.SIGKILL)
    server.wait_for(lambda: not pidfile.is_alive(server.info))  # type: ignore[arg-type]
    assert not any(p.name.endswith(".tmp") for p in (server.log_dir / "config").iterdir())
    server.start(ncs=False)
    try:
        assert models(server) == {"swiss": ["1.0"]}
    finally:
        server.stop()


def test_ts_config_naming_a_snapshot(server: Server) -> None:
    server.start("swiss.mar", "other.mar", ncs=False)
    server.stop()
    shutdown = snapshots(server)[-1]
    lines = [
        line for line in shutdown.read_text().splitlines() if line.startswith("model_snapshot=")
    ]
    server.properties["model_snapshot"] = lines[0].removeprefix("model_snapshot=")
    server.start()  # --ncs, yet --ts-config carries a snapshot: its models load
    try:
        assert models(server) == {"other": ["1.0"], "swiss": ["1.0"]}
    finally:
        server.stop()


def test_restores_a_snapshot_torchserve_wrote(server: Server) -> None:
    """Switching from TorchServe: its shutdown snapshot (Java's escapes) in ./logs/config."""
    folder = server.log_dir / "config"
    folder.mkdir(parents=True)
    snapshot = (
        '{\\n  "name"\\: "20261202055825505-shutdown.cfg",\\n  "modelCount"\\: 2,\\n'
        '  "models"\\: {\\n    "swiss"\\: {\\n'
        '      "1.0"\\: {"defaultVersion"\\: true, "marName"\\: "swiss.mar", "minWorkers"\\: 2,'
        ' "maxWorkers"\\: 2, "batchSize"\\: 4, "maxBatchDelay"\\: 50,'
        ' "responseTimeout"\\: 120, "runtimeType"\\: "python"}},\\n'
        '    "other"\\: {"1.0"\\: {"defaultVersion"\\: true, "marName"\\: "other.mar",'
        ' "minWorkers"\\: 1, "maxWorkers"\\: 1, "batchSize"\\: 1, "maxBatchDelay"\\: 100}}\\n'
        "  }\\n}"
    )
    (folder / "20261202055825505-shutdown.cfg").write_text(
        "#Saving snapshot\n#Wed Dec 02 05:58:25 UTC 2026\n"
        "inference_address=http\\://127.0.0.1\\:8080\n"
        "load_models=swiss\\=swiss.mar\n"
        f"model_snapshot={snapshot}\n"
        "tsConfigFile=config.properties\nversion=0.12.0\n"
    )
    server.start(ncs=False)
    try:
        assert models(server) == {"other": ["1.0"], "swiss": ["1.0"]}
        [swiss] = server.manage("GET", "/models/swiss").json()
        assert (swiss["batchSize"], swiss["maxBatchDelay"], len(swiss["workers"])) == (4, 50, 2)
    finally:
        server.stop()


def test_unknown_setting_is_a_warning(server: Server) -> None:
    server.properties["no_such_setting"] = "1"
    result = server.start("swiss.mar")
    try:
        assert "tsctl: warning: unknown setting 'no_such_setting'" in result.stderr
    finally:
        server.stop()


def test_unwritable_snapshot_folder_is_reported_not_fatal(server: Server) -> None:
    server.log_dir.mkdir(parents=True)
    (server.log_dir / "config").write_text("a file where the folder should be")
    server.start("swiss.mar", ncs=False)
    try:
        assert server.manage("PUT", "/models/swiss?min_worker=2&synchronous=true").status == 200
        assert server.predict("swiss", {}).status == 200
        log = (server.log_dir / "ts_log.log").read_text()
        assert "cannot write a config snapshot" in log
    finally:
        server.stop()


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound, noted, released together, so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start_without_ts_config(server: Server, *flags: str) -> None:
    """`tsctl serve start` with no --ts-config and no --ncs, from the server's folder."""
    from tests.support.cli import run_tsctl

    server.watch_logs()
    started = run_tsctl(
        "serve", "start", "--model-store", server.store, "--disable-token-auth",
        "--state-dir", server.state_dir, "--log-dir", server.log_dir, *flags,
        cwd=server.root,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    server.info = pidfile.read(pidfile.pid_path(server.state_dir))
    assert server.info is not None


def test_started_again_without_ts_config_the_snapshot_restores_the_server(
    server: Server,
) -> None:
    """TorchServe's restore: the newest snapshot's properties (addresses and ports included)
    are the configuration, its models are loaded, and flags win over both."""
    inference, management, metrics = _free_ports(3)
    server.properties.update(
        inference_address=f"http://127.0.0.1:{inference}",
        management_address=f"http://127.0.0.1:{management}",
        metrics_address=f"http://127.0.0.1:{metrics}",
        job_queue_size=7,
        enable_grpc="false",
    )
    server.start("swiss.mar", ncs=False)
    server.stop()
    recorded = snapshots(server)[-1].read_text()
    assert f"inference_address=http\\://127.0.0.1\\:{inference}" in recorded or (
        f"inference_address=http://127.0.0.1:{inference}" in recorded
    )
    assert "enable_grpc=false" in recorded and "job_queue_size=7" in recorded

    _start_without_ts_config(server)
    try:
        assert server.inference == f"http://127.0.0.1:{inference}"
        assert server.management == f"http://127.0.0.1:{management}"
        assert server.info is not None and server.info.grpc_inference_address == ""
        assert models(server) == {"swiss": ["1.0"]}
        [swiss] = server.manage("GET", "/models/swiss").json()
        assert swiss["jobQueueStatus"]["remainingCapacity"] == 7
        assert server.predict("swiss", {}).status == 200
    finally:
        server.stop()

    _start_without_ts_config(server, "--models", "other.mar")  # --models wins over its models
    try:
        assert server.management == f"http://127.0.0.1:{management}"
        assert models(server) == {"other": ["1.0"]}
    finally:
        server.stop()
