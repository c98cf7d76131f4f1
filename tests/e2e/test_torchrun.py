"""Multi-process models (parallelType, torchrun): one instance of 4 ranks on the CPU (gloo),
started by the real torchrun; rank 0 answers, every rank runs each batch; a rank killed takes
its instance down and it comes back whole; no rank outlives the server."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.ipc.messages import WorkerSpec
from tsctl.server.settings import ModelSettings
from tsctl.server.workers.torchrun import Instance, launcher

RANKS = 4
TP = {"parallelType": "tp", "deviceType": "cpu", "torchrun": {"nproc-per-node": RANKS}}
#: two ranks, a short response timeout: for the ways the daemon ends an instance itself
TP2 = {
    "parallelType": "tp",
    "deviceType": "cpu",
    "torchrun": {"nproc-per-node": 2},
    "responseTimeout": 2,
}


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("torchrun"))
    make_archive(srv.store, "tp", "ranks_allreduce", config=TP)
    make_archive(srv.store, "tp2", "ranks_allreduce", config=TP2)
    srv.start("tp.mar", "tp2.mar")
    yield srv
    srv.stop()


def worker_pid(server: Server, model: str = "tp") -> int:
    [worker] = server.manage("GET", f"/models/{model}").json()[0]["workers"]
    return int(worker["pid"])


def ask(server: Server, n: int, model: str = "tp") -> tuple[Any, bytes, dict[str, str]]:
    """One prediction: the final answer (JSON), the whole body, the response headers."""
    reply = server.predict(model, str(n), headers={"Content-Type": "text/plain"})
    assert reply.status == 200, reply.body
    assert reply.body.startswith(b"early ")  # rank 0's intermediate answer came first
    return json.loads(reply.body.removeprefix(b"early ")), reply.body, reply.headers


def test_every_rank_runs_each_batch_and_rank_0_answers_in_chunks(server: Server) -> None:
    answer, _, headers = ask(server, 42)
    assert headers["transfer-encoding"] == "chunked"
    assert answer["sum"] == 42 * (1 + 2 + 3 + 4)  # each rank's share, all-reduced
    assert answer["world"] == RANKS
    assert answer["local_ranks"] == ["0", "1", "2", "3"]
    assert answer["gpu_id"] is None  # deviceType cpu
    assert len(set(answer["pids"])) == RANKS
    again, _, _ = ask(server, 5)
    assert again["sum"] == 50 and again["pids"] == answer["pids"]  # the same instance


def test_describe_reports_the_parallelism(server: Server) -> None:
    described = server.manage("GET", "/models/tp").json()[0]
    assert (described["parallelType"], described["parallelLevel"]) == ("tp", RANKS)


@pytest.mark.daemon_errors(r"ChildFailedError")  # torchrun's report of the killed rank
def test_a_killed_rank_takes_the_instance_down_and_it_comes_back(server: Server) -> None:
    before, _, _ = ask(server, 1)
    torchrun = worker_pid(server)
    os.kill(before["pids"][2], signal.SIGKILL)
    server.wait_for(lambda: not alive(torchrun), timeout=60)
    for pid in before["pids"]:  # the whole instance went, not just the rank
        server.wait_for(lambda pid=pid: not alive(pid), timeout=60)
    server.wait_for(lambda: server.predict("tp", "1").status == 200, timeout=120)
    after, _, _ = ask(server, 3)
    assert after["sum"] == 30
    assert not set(after["pids"]) & set(before["pids"])
    assert worker_pid(server) != torchrun
    # torchrun's report of the rank it lost reaches model_log.log (as a warning: its stderr)
    server.wait_for(lambda: "ChildFailedError" in server.model_log())


def gone(server: Server, pids: list[int]) -> None:
    for pid in pids:
        server.wait_for(lambda pid=pid: not alive(pid), timeout=60)


@pytest.mark.daemon_errors(r"overran the response timeout")
def test_a_batch_past_its_deadline_kills_every_rank(server: Server) -> None:
    before, _, _ = ask(server, 1, "tp2")
    assert before["sum"] == 3 and before["gpu_id"] is None  # deviceType cpu
    torchrun = worker_pid(server, "tp2")
    late = server.predict("tp2", "sleep", headers={"Content-Type": "text/plain"})
    assert late.status == 500, late.body
    gone(server, [torchrun, *before["pids"]])  # the daemon killed the instance's groups
    server.wait_for(lambda: server.predict("tp2", "1").status == 200, timeout=120)


@pytest.mark.daemon_errors(r".", required=False)  # whatever torchrun's end leaves in the log
def test_ranks_die_with_torchrun(server: Server) -> None:
    before, _, _ = ask(server, 2, "tp2")
    torchrun = worker_pid(server, "tp2")
    os.kill(torchrun, signal.SIGKILL)  # no chance to stop its ranks: the kernel does
    gone(server, [torchrun, *before["pids"]])
    server.wait_for(lambda: server.predict("tp2", "1").status == 200, timeout=120)
    after, _, _ = ask(server, 4, "tp2")
    assert after["sum"] == 12 and not set(after["pids"]) & set(before["pids"])


@pytest.mark.daemon_errors("rank 1 cannot load its shard", "starting workers for bad")
@pytest.mark.daemon_errors("ChildFailedError", required=False)  # torchrun, on the exit
def test_one_rank_failing_to_load_fails_the_start_with_its_message(tmp_path: Path) -> None:
    srv = Server(tmp_path, properties={"enable_model_api": "true"})
    make_archive(srv.store, "bad", "ranks_allreduce", config={**TP2, "handler": {"fail_rank": 1}})
    srv.start()
    try:
        answer = srv.manage("POST", "/models?url=bad.mar&initial_workers=1&synchronous=true")
        assert answer.status >= 400, answer.body
        assert "rank 1 cannot load its shard" in answer.json()["message"]
    finally:
        srv.stop()


def test_no_rank_is_left_after_the_server_stops(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "tp", "ranks_allreduce", config=TP)
    srv.start("tp.mar")
    answer, _, _ = ask(srv, 2)
    torchrun = worker_pid(srv)
    result = srv.stop()
    assert result.returncode == 0, result.stderr
    for pid in [torchrun, *answer["pids"]]:
        srv.wait_for(lambda pid=pid: not alive(pid), timeout=30)


def test_settings_are_checked_when_the_model_loads() -> None:
    def settings(**doc: Any) -> ModelSettings:
        return ModelSettings.model_validate(doc)

    assert launcher("m", settings(), 0) is None
    made = launcher("m", settings(parallelType="pp", parallelLevel=2), 0)
    assert made is not None and made.level == 2 and made.next_devices() == ()
    gpus = launcher("m", settings(**{**TP, "deviceType": "gpu"}), 8)
    assert gpus is not None
    assert [gpus.next_devices() for _ in range(3)] == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)]
    ids = launcher("m", settings(parallelLevel=2, deviceIds=[3, 1, 2]), 4)
    assert ids is not None and [ids.next_devices() for _ in range(2)] == [(3, 1), (3, 1)]
    with pytest.raises(Exception, match="each instance has 4 ranks, one GPU each"):
        launcher("m", settings(**{**TP, "deviceType": "gpu"}), 2)
    with pytest.raises(Exception, match="parallelLevel 2 and torchrun nproc-per-node 4 differ"):
        launcher("m", settings(**TP, parallelLevel=2), 0)
    with pytest.raises(Exception, match="not a parallelType tsctl runs"):
        settings(parallelType="custom")
    with pytest.raises(Exception, match="less than or equal to 1"):
        settings(torchrun={"nnodes": 2})


def test_an_instance_on_gpus_sees_its_own_and_runs_torchrun_from_this_interpreter() -> None:
    torchrun = launcher("m", ModelSettings.model_validate({**TP, "deviceType": "gpu"}), 8)
    assert torchrun is not None
    make = torchrun.factory(lambda: WorkerSpec("m", "/models/m", "handler"))
    make("1-m")  # the first instance takes GPUs 0-3
    worker = make("2-m")
    spec = worker.spec
    assert (spec.gpu_id, spec.parallel_type, spec.parallel_level, spec.threads) == (4, "tp", 4, 1)
    assert isinstance(worker.launcher, Instance)
    env = torchrun.environment(worker.launcher.devices)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["OMP_NUM_THREADS"] == "1"
    command = torchrun.command(spec, Path("/run/r.sock"), Path("/run/logs"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--max-restarts") + 1] == "0"
    assert command[command.index("--rdzv-endpoint") + 1] == "localhost:0"
    assert command[-5:] == ["-m", "tsctl.worker", "0", "--ranks", "/run/r.sock"]
