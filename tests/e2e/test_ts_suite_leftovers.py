"""What TorchServe 0.12's own tests expect, and tsctl now does: workers that are still starting
in the describe API, the log lines of a start past its `startupTimeout`, a model whose default
workers fail kept registered, and the environment's word on token authorization over the flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import Server, make_archive


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path, properties={"enable_model_api": "true"})


def test_describe_lists_workers_that_are_still_starting(server: Server, tmp_path: Path) -> None:
    make_archive(server.store, "slowload", "slowload")
    marker = tmp_path / "loading"
    server.start(env={"SLOWLOAD_MARKER": str(marker)})
    try:
        registered = server.manage("POST", "/models?url=slowload.mar&initial_workers=0")
        assert registered.status == 200, registered.body
        assert server.manage("GET", "/models/slowload").json()[0]["workers"] == []
        scaled = server.manage("PUT", "/models/slowload?min_worker=2")
        assert scaled.status == 202, scaled.body
        server.wait_for(marker.exists)  # both workers exist; they load for an hour
        workers = server.manage("GET", "/models/slowload").json()[0]["workers"]
        assert [w["status"] for w in workers] == ["STARTING", "STARTING"], workers
        assert all(isinstance(w["pid"], int) for w in workers), workers
    finally:
        server.stop()


@pytest.mark.daemon_errors("Backend worker error", "starting workers for slowload")
def test_a_start_past_startup_timeout_logs_backend_worker_error(
    server: Server, tmp_path: Path
) -> None:
    make_archive(server.store, "slowload", "slowload", config={"startupTimeout": 1})
    marker = tmp_path / "loading"
    server.start(env={"SLOWLOAD_MARKER": str(marker)})
    log_file = server.log_dir / "ts_log.log"
    try:
        answer = server.manage(
            "POST", "/models?url=slowload.mar&initial_workers=1&synchronous=false"
        )
        assert answer.status == 202, answer.body

        def logged() -> bool:
            return "Backend worker error" in log_file.read_text()

        server.wait_for(logged)
        lines = log_file.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if "Backend worker error" in line)
        assert "[ERROR]" in lines[at] and "W-9000-slowload_1.0" in lines[at]
        # TorchServe's second line, which its tests (and log-based alerts) read
        assert lines[at + 1].startswith(
            "org.pytorch.serve.wlm.WorkerInitializationException: "
            "Backend worker did not respond in given time ("
        ), lines[at + 1]
        assert "within 1 s" in lines[at + 1]
    finally:
        server.stop()


@pytest.mark.daemon_errors("cannot load the weights", "starting workers for broken")
def test_default_workers_that_fail_leave_the_model_registered(server: Server) -> None:
    # no initial_workers: TorchServe registers the model with none; tsctl tries its default
    # workers, and when they fail the model stays registered without workers, as TorchServe's
    make_archive(server.store, "broken", "broken")
    server.start()
    try:
        answer = server.manage("POST", "/models?url=broken.mar")
        assert answer.status == 200, answer.body
        status = answer.json()["status"]
        assert status.startswith('Model "broken" Version: 1.0 registered with 0 initial workers')
        assert "cannot load the weights" in status and "Use scale workers API" in status
        described = server.manage("GET", "/models/broken").json()[0]
        assert (described["minWorkers"], described["workers"]) == (0, [])
        refused = server.predict("broken", b"x")
        assert refused.status == 503 and "has no worker" in refused.json()["message"]
        # asked for explicitly, a failed start is still the register's failure
        explicit = server.manage("POST", "/models?url=broken.mar&model_name=b2&initial_workers=1")
        assert explicit.status == 500, explicit.body
        names = [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
        assert names == ["broken"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("env_value", "flag", "file_value", "expected"),
    [
        # TorchServe's test_priority_env_cmd: the environment over the flag
        ("false", True, None, 400),
        # its test_priority_env: the environment over the file
        ("true", False, "false", 200),
        # its test_priority: the flag over the file
        (None, True, "false", 200),
    ],
)
def test_token_authorization_environment_then_flag_then_file(
    server: Server, env_value: str | None, flag: bool, file_value: str | None, expected: int
) -> None:
    server.properties["enable_envvars_config"] = "true"
    if file_value is not None:
        server.properties["disable_token_authorization"] = file_value
    env = {"TS_DISABLE_TOKEN_AUTHORIZATION": env_value} if env_value is not None else {}
    server.start(auth=not flag, env=env)
    try:
        assert server.manage("GET", "/models").status == expected
    finally:
        server.stop()
