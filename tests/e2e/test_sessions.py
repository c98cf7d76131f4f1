"""Stateful sessions (TorchServe's sequence batching and continuous batching) on a real daemon
with real workers: order, end, cancel, expiry, unknown ids and caps, over REST and gRPC.

The handler is tests/fixtures/handlers/session_counter.py. Requests that must be running or
queued at a given moment are held in the handler by a gate file, and the test waits for them
(the handler's `entered` file, the queue-depth metric, the server's log), never for a time.
The expiry cases wait for the configured idle or total time itself to pass (their settings
are short), then for the sweep's log line.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.support.daemon import Response, Server, make_archive
from tests.support.grpc_stubs import torchserve_stubs

pytestmark = pytest.mark.slow

HEADER = "ts_request_sequence_id"
STATEFUL = {
    "minWorkers": 2,
    "maxWorkers": 2,
    "batchSize": 1,
    "maxNumSequence": 2,
    "sequenceMaxIdleMSec": 30000,
    "maxSequenceJobQueueSize": 2,
    "sequenceBatching": True,
    "continuousBatching": True,
}
REFUSED = "If this is a sequence inference, please check if it is closed, or expired"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("sessions"))
    make_archive(srv.store, "counter", "session_counter", config=STATEFUL)
    make_archive(
        srv.store,
        "idle",
        "session_counter",
        config={**STATEFUL, "minWorkers": 1, "maxWorkers": 1, "sequenceMaxIdleMSec": 300},
    )
    make_archive(
        srv.store,
        "brief",
        "session_counter",
        config={**STATEFUL, "minWorkers": 1, "maxWorkers": 1, "sequenceTimeoutMSec": 1500},
    )
    srv.start("counter.mar", "idle.mar", "brief.mar")
    yield srv
    srv.stop()


def send(server: Server, model: str, command: dict[str, Any], session: str | None = None) -> Any:
    headers = {HEADER: session} if session else {}
    return server.predict(model, command, headers=headers)


def opened(server: Server, model: str = "counter") -> str:
    """A new session's id (its first request adds 0)."""
    answer = send(server, model, {"add": 0})
    assert answer.status == 200, answer.body
    assert answer.json()["started"] is True
    return answer.headers[HEADER]


def end(server: Server, session: str, model: str = "counter") -> None:
    assert send(server, model, {"end": True}, session).status == 200


class Background:
    """A request sent from a thread; `result()` waits for its answer."""

    def __init__(self, server: Server, model: str, command: dict[str, Any], session: str):
        self.answer: Response | None = None
        self.thread = threading.Thread(target=self._run, args=(server, model, command, session))
        self.thread.start()

    def _run(self, server: Server, model: str, command: dict[str, Any], session: str) -> None:
        self.answer = send(server, model, command, session)

    def result(self) -> Response:
        self.thread.join(60)
        assert self.answer is not None
        return self.answer


def held(server: Server, tmp: Path, session: str, model: str = "counter", **more: Any) -> Any:
    """A request of `session` that holds its worker until `tmp/gate` exists."""
    command = {"entered": str(tmp / "entered"), "gate": str(tmp / "gate"), **more}
    request = Background(server, model, command, session)
    server.wait_for((tmp / "entered").exists)
    return request


def refused(answer: Response, *words: str) -> None:
    assert answer.status == 503, answer.body
    message = answer.json()["message"]
    assert REFUSED in message
    for word in words:
        assert word in message


def log_has(server: Server, text: str) -> bool:
    path = server.log_dir / "ts_log.log"
    return path.exists() and text in path.read_text()


def test_a_new_session_gets_an_id_and_keeps_it(server: Server) -> None:
    first = send(server, "counter", {"add": 3})
    session = first.headers[HEADER]
    assert session.startswith("ts-seq-")
    assert first.json() == {
        "pid": first.json()["pid"],
        "sequence": session,
        "sum": 3,
        "started": True,
        "seen": [3],
    }
    second = send(server, "counter", {"add": 4}, session)
    assert second.headers[HEADER] == session
    assert second.json()["sum"] == 7 and second.json()["started"] is False
    end(server, session)


def test_two_sessions_in_parallel_each_stay_on_their_worker(server: Server) -> None:
    answers: dict[int, list[Any]] = {1: [], 2: []}

    def client(step: int) -> None:
        session = opened(server)
        for _ in range(6):
            answers[step].append(send(server, "counter", {"add": step}, session).json())
        end(server, session)

    threads = [threading.Thread(target=client, args=(step,)) for step in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for step in (1, 2):
        assert [a["sum"] for a in answers[step]] == [step * n for n in range(1, 7)]
        assert len({a["pid"] for a in answers[step]}) == 1
    # one session per worker (maxNumSequence 2 over 2 workers): they ran side by side
    assert answers[1][0]["pid"] != answers[2][0]["pid"]


def test_a_sessions_requests_run_one_at_a_time_in_order(server: Server, tmp_path: Path) -> None:
    session = opened(server)
    first = held(server, tmp_path, session, add=1)
    second = Background(server, "counter", {"add": 2}, session)
    server.wait_for(lambda: server.queued("counter") == 1)  # the idle worker may not take it
    third = Background(server, "counter", {"add": 3}, session)
    server.wait_for(lambda: server.queued("counter") == 2)
    # one running and maxSequenceJobQueueSize (2) waiting: a fourth is refused at once
    refused(send(server, "counter", {"add": 4}, session), "maxSequenceJobQueueSize")
    (tmp_path / "gate").touch()
    assert first.result().json()["seen"] == [0, 1]
    assert second.result().json()["seen"] == [0, 1, 2]
    assert third.result().json()["seen"] == [0, 1, 2, 3]
    pids = {r.result().json()["pid"] for r in (first, second, third)}
    assert len(pids) == 1
    end(server, session)


def test_the_end_answers_what_waits_and_refuses_what_follows(
    server: Server, tmp_path: Path
) -> None:
    session = opened(server)
    last = held(server, tmp_path, session, add=1, end=True)
    waiting = Background(server, "counter", {"add": 2}, session)
    server.wait_for(lambda: server.queued("counter") == 1)
    (tmp_path / "gate").touch()
    answer = last.result()
    assert answer.status == 200 and answer.json()["sum"] == 1
    assert answer.headers["ts_request_sequence_end"] == session
    refused(waiting.result(), session, "ended")
    refused(send(server, "counter", {"add": 3}, session), session, "ended")


def test_a_request_of_the_session_cancels_its_stream(server: Server, tmp_path: Path) -> None:
    session = opened(server)
    chunks: list[bytes] = []
    headers: dict[str, str] = {}

    def stream() -> None:
        host, port = server.inference.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        command = {"stream": 2000, "entered": str(tmp_path / "entered")}
        conn.request("POST", "/predictions/counter", json.dumps(command), {HEADER: session})
        reply = conn.getresponse()
        headers.update({k.lower(): v for k, v in reply.getheaders()})
        while piece := reply.read1():
            chunks.append(piece)
        conn.close()

    streaming = threading.Thread(target=stream)
    streaming.start()
    server.wait_for((tmp_path / "entered").exists)
    server.wait_for(lambda: len(chunks) > 1)  # it streams, and its session takes requests
    cancel = send(server, "counter", {"cancel": True}, session)
    assert cancel.status == 200 and cancel.body == b"cancelled"
    streaming.join(60)
    assert headers["transfer-encoding"] == "chunked" and headers[HEADER] == session
    body = b"".join(chunks).decode()
    assert body.startswith("chunk start") and body.endswith("done")
    assert body.count("chunk") < 2000
    end(server, session)


def test_ids_the_server_does_not_know(server: Server) -> None:
    refused(send(server, "counter", {"add": 1}, "ts-seq-0000"), "ts-seq-0000", "unknown")
    # an id the client chooses opens a session (TorchServe's sequence-batching example)
    mine = send(server, "counter", {"add": 5}, "mine-1")
    assert mine.status == 200 and mine.headers[HEADER] == "mine-1"
    assert mine.json()["started"] is False and mine.json()["sum"] == 5
    end(server, "mine-1")
    answer = send(server, "counter", {"add": 1}, "x" * 300)
    assert answer.status == 400 and HEADER in answer.json()["message"]


def test_sessions_are_capped(server: Server) -> None:
    sessions = [opened(server), opened(server)]
    refused(send(server, "counter", {"add": 1}), "maxNumSequence")
    refused(send(server, "counter", {"add": 1}, "another"), "maxNumSequence")
    end(server, sessions.pop())
    sessions.append(opened(server))  # the ended one's place
    for session in sessions:
        end(server, session)


def test_an_idle_session_expires(server: Server) -> None:
    session = opened(server, "idle")
    server.wait_for(lambda: log_has(server, f"sequence {session} of model idle closed"))
    refused(send(server, "idle", {"add": 1}, session), session, "sequenceMaxIdleMSec")


def test_a_session_expires_while_its_client_waits(server: Server, tmp_path: Path) -> None:
    session = opened(server, "brief")
    running = held(server, tmp_path, session, model="brief", add=1)
    waiting = Background(server, "brief", {"add": 2}, session)
    server.wait_for(lambda: server.queued("brief") == 1)
    # its sequenceTimeoutMSec passes while both wait; then the sweep's word
    server.wait_for(lambda: log_has(server, f"sequence {session} of model brief expired"))
    refused(send(server, "brief", {"add": 3}, session), "sequenceTimeoutMSec")
    (tmp_path / "gate").touch()
    # what it queued before its time was up is served, as TorchServe serves it
    assert running.result().json()["sum"] == 1
    assert waiting.result().json()["sum"] == 3
    server.wait_for(lambda: log_has(server, f"sequence {session} of model brief closed"))
    refused(send(server, "brief", {"add": 4}, session), "sequenceTimeoutMSec")


@pytest.fixture(scope="module")
def stubs(server: Server, ts_protos: dict[str, ModuleType]) -> Iterator[tuple[Any, Any]]:
    with torchserve_stubs(server, ts_protos) as found:
        yield found


def test_grpc_stream2_sessions(stubs: Any, ts_protos: dict[str, ModuleType]) -> None:
    pb = ts_protos["inference_pb2"]

    def stream2(*requests: Any) -> list[Any]:
        return list(stubs[0].StreamPredictions2(iter(requests), timeout=60))

    start = pb.PredictionsRequest(
        model_name="counter",
        input={"body": b'{"add": 1}', "ts_request_sequence_start": b"true"},
    )
    [first] = stream2(start)
    session = first.sequence_id
    assert session.startswith("ts-seq-") and json.loads(first.prediction)["sum"] == 1
    adds = [
        pb.PredictionsRequest(
            model_name="counter", input={"body": f'{{"add": {n}}}'.encode()}, sequence_id=session
        )
        for n in (2, 3)
    ]
    answers = stream2(*adds)
    assert [a.sequence_id for a in answers] == [session, session]
    assert [json.loads(a.prediction)["seen"] for a in answers] == [[1, 2], [1, 2, 3]]
    streaming = pb.PredictionsRequest(
        model_name="counter", input={"body": b'{"stream": 3}'}, sequence_id=session
    )
    steps = stream2(streaming)
    assert [a.prediction for a in steps] == [b"chunk start", b"chunk 2", b"chunk 1", b"done"]
    assert {a.sequence_id for a in steps} == {session}
    ending = pb.PredictionsRequest(
        model_name="counter", input={"body": b'{"end": true}'}, sequence_id=session
    )
    [closing, after] = stream2(ending, adds[0])
    assert json.loads(closing.prediction)["sum"] == 6
    assert after.status.code == grpc.StatusCode.INTERNAL.value[0]
    assert REFUSED in after.status.message and "ended" in after.status.message
    [nameless] = stream2(pb.PredictionsRequest(model_name="counter", input={"body": b"{}"}))
    assert nameless.status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "Parameter sequenceId is required" in nameless.status.message


def test_describe_shows_the_session_settings(server: Server) -> None:
    described = server.manage("GET", "/models/counter").json()[0]
    assert described["stateful"] is True
    assert described["continuousBatching"] is True
    assert described["sequenceMaxIdleMSec"] == 30000
    assert described["maxNumSequence"] == 2
    assert described["maxSequenceJobQueueSize"] == 2
    assert described["sequenceTimeoutMSec"] == 0


#: one worker each; a server whose queue takes one request and whose answers, a stream's
#: chunks all together, are at most LIMIT bytes
ONE = {**STATEFUL, "minWorkers": 1, "maxWorkers": 1}
LIMIT = 3000


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("bounded"),
        properties={"job_queue_size": 1, "max_response_size": LIMIT},
    )
    make_archive(srv.store, "timed", "session_counter", config={**ONE, "responseTimeout": 1})
    recycled = {**ONE, "recycleAfterRequests": 2}
    make_archive(srv.store, "recycled", "session_counter", config=recycled)
    make_archive(srv.store, "sized", "session_counter", config=ONE)
    make_archive(srv.store, "tight", "session_counter", config=ONE)
    srv.start("timed.mar", "recycled.mar", "sized.mar", "tight.mar")
    yield srv
    srv.stop()


def worker_pids(server: Server, model: str) -> list[int]:
    return [w["pid"] for w in server.manage("GET", f"/models/{model}").json()[0]["workers"]]


def test_a_stream_longer_than_the_response_timeout_runs_on(bounded: Server) -> None:
    session = opened(bounded, "timed")
    assert send(bounded, "timed", {"add": 5}, session).json()["sum"] == 5
    pids = worker_pids(bounded, "timed")
    # 200 steps of at least 10 ms each, the timeout 1 s: each step has the timeout of its
    # own (TorchServe's), so the stream outlives it, and the worker (its sessions) stays
    streamed = bounded.predict("timed", {"stream": 200})
    assert streamed.status == 200 and streamed.body.endswith(b"done"), streamed.body
    assert streamed.body.count(b"chunk") == 200
    assert worker_pids(bounded, "timed") == pids
    assert send(bounded, "timed", {"add": 1}, session).json()["sum"] == 6


def test_a_worker_is_recycled_after_its_stream_not_during_it(bounded: Server) -> None:
    [first] = worker_pids(bounded, "recycled")
    session = opened(bounded, "recycled")  # its first request; the stream's is the second
    streamed = send(bounded, "recycled", {"stream": 300}, session)
    assert streamed.status == 200 and streamed.body.endswith(b"done"), streamed.body
    assert streamed.body.count(b"chunk") == 300  # its steps were no new requests (2.6 kB)
    bounded.wait_for(lambda: worker_pids(bounded, "recycled") not in ([], [first]))
    bounded.wait_for(lambda: first not in worker_pids(bounded, "recycled"))  # successor first


def test_a_continuous_streams_chunks_count_against_max_response_size(bounded: Server) -> None:
    streamed = bounded.predict("sized", {"stream": 1000})  # 1000 chunks of about 9 bytes
    assert streamed.status == 200
    assert b"exceeds max_response_size" in streamed.body, streamed.body
    assert b"done" not in streamed.body


@pytest.mark.daemon_errors(r"queue is full", required=False)
def test_a_request_refused_at_the_queue_opens_no_session(bounded: Server, tmp_path: Path) -> None:
    session = opened(bounded, "tight")
    running = held(bounded, tmp_path, session, model="tight", add=1)
    waiting = Background(bounded, "tight", {"add": 2}, session)
    bounded.wait_for(lambda: bounded.queued("tight") == 1)  # the queue is full
    for _ in range(3):  # each would open a session, of the 2 the model may have
        full = send(bounded, "tight", {"add": 0})
        assert full.status == 503 and "queue is full" in full.json()["message"], full.body
    (tmp_path / "gate").touch()
    assert running.result().json()["sum"] == 1 and waiting.result().json()["sum"] == 3
    other = opened(bounded, "tight")  # the one place left is free
    end(bounded, other, "tight")
    end(bounded, session, "tight")
