"""Multi-process models (parallelType, torchrun): one instance of 4 ranks on the CPU (gloo),
started by the real torchrun; rank 0 answers, every rank runs each batch; a rank killed takes
its instance down and it comes back whole; no rank outlives the server."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Server, make_archive

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


@pytest.mark.daemon_errors(r".", required=False)  # the ranks' ends, torchrun's report
@pytest.mark.parametrize("rank", [1, 0])
def test_a_batch_failing_on_one_rank_restarts_the_instance_whole(tmp_path: Path, rank: int) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "tp", "ranks_failing", config={**TP2, "responseTimeout": 600})
    srv.start("tp.mar")
    try:
        text = {"Content-Type": "text/plain"}
        before = srv.predict("tp", "1", headers=text).json()
        assert before["sum"] == 3
        failed = srv.predict("tp", f"fail {rank}", headers=text)
        assert failed.status in (500, 503), failed.body
        # rank 0 sends its own failure, then ends the instance; another rank's ends it at once
        assert ("Prediction failed" if rank == 0 else "died") in failed.json()["message"]
        gone(srv, before["pids"])  # not one rank is left waiting in its all-reduce
        srv.wait_for(lambda: srv.predict("tp", "1", headers=text).status == 200, timeout=120)
        after = srv.predict("tp", "3", headers=text).json()
        assert after["sum"] == 9 and not set(after["pids"]) & set(before["pids"])
    finally:
        srv.stop()


def test_no_rank_is_left_after_a_scale_down_or_an_unregister(tmp_path: Path) -> None:
    srv = Server(tmp_path, properties={"enable_model_api": "true"})
    make_archive(srv.store, "tp2", "ranks_allreduce", config=TP2)
    srv.start("tp2.mar")
    try:
        first, _, _ = ask(srv, 1, "tp2")
        torchrun = worker_pid(srv, "tp2")
        down = srv.manage("PUT", "/models/tp2?min_worker=0&max_worker=0&synchronous=true")
        assert down.status == 200, down.body
        gone(srv, [torchrun, *first["pids"]])
        up = srv.manage("PUT", "/models/tp2?min_worker=1&synchronous=true")
        assert up.status == 200, up.body
        second, _, _ = ask(srv, 1, "tp2")
        torchrun = worker_pid(srv, "tp2")
        assert srv.manage("DELETE", "/models/tp2").status == 200
        gone(srv, [torchrun, *second["pids"]])
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
