"""`Sessions` with its `ModelQueue` on virtual time: ids, order, caps, end, expiry and the
continuous batching of sessions' streams, as the worker pool and the API adapters drive them.

The loop is tests/unit/test_batching.py's `VirtualLoop`: its clock only moves when everything
waits on a timer, so the sweep of a 30 s idle time costs no real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.unit.test_batching import VirtualLoop, run
from tsctl.errors import BadRequest, PredictionFailed, RequestTooLarge
from tsctl.ipc.messages import Part
from tsctl.server import batching
from tsctl.server.batching import ModelQueue, next_batch
from tsctl.server.request import InferenceRequest, Job, Response
from tsctl.server.sessions import (
    MAX_HELD_CHUNKS,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_START,
    STREAM_NEXT,
    HeldChunks,
    SequenceRefused,
    Sessions,
    SessionSettings,
    continued,
)

_ids = iter(range(1, 1 << 30))
LIMIT = 1 << 20  # max_response_size


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    asyncio.set_event_loop(virtual)
    yield virtual
    asyncio.set_event_loop(None)
    virtual.close()


def settings(**changes: object) -> SessionSettings:
    values: dict[str, object] = {
        "idle_ms": 30000,
        "timeout_ms": 0,
        "max_queue": 2,
        "max_num": 2,
        "continuous": True,
        "batch_size": 1,
        "min_workers": 2,
        "max_workers": 2,
        **changes,
    }
    return SessionSettings.of(**values)  # type: ignore[arg-type]


def sessions_on(loop: VirtualLoop, **changes: object) -> Sessions:
    queue = ModelQueue(100, clock=loop.time)
    return Sessions("m", settings(**changes), queue, clock=loop.time)


class Client:
    """The answers its jobs got (a REST exchange's `on_answer`)."""

    def __init__(self) -> None:
        self.answers: dict[str, Response | BaseException] = {}
        self.chunks: list[Response] = []


def submit(
    sessions: Sessions, client: Client, sequence: str | None = None, headers: list | None = None
) -> Job:
    """What `inference.submit` does for a stateful model, on virtual time."""
    request = InferenceRequest(
        f"r{next(_ids)}", [Part("body", "", b"1")], headers or [], sessions.clock()
    )

    async def admitted() -> tuple[InferenceRequest, str]:  # on the loop: it arms the sweep
        return sessions.admit(request, sequence)

    request, sequence = asyncio.get_event_loop().run_until_complete(admitted())
    job = Job(
        request,
        None,
        sessions.clock() + 600,
        sequence=sequence,
        on_answer=lambda outcome: client.answers.__setitem__(request.request_id, outcome),
        on_chunk=client.chunks.append,
        settle=sessions.queue.settle,
    )
    sessions.queue.put(job)
    return job


def ok(*headers: tuple[str, str]) -> Response:
    return Response(200, "text/plain", b"ok", headers)


def answer(sessions: Sessions, job: Job, response: Response) -> Response | None:
    """What the pool does with a worker's answer to a session's job."""
    kept = sessions.answered(job, response, LIMIT)
    if kept is not None:
        job.answer(kept)
    return kept


def test_a_request_without_an_id_opens_a_session(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    client = Client()
    job = submit(sessions, client)
    assert job.sequence is not None and job.sequence.startswith("ts-seq-")
    headers = dict(job.request.headers)
    assert headers[SEQUENCE_ID] == job.sequence and headers[SEQUENCE_START] == "true"
    assert sessions.queue.take("a") is job
    sent = answer(sessions, job, ok())
    assert sent is not None and dict(sent.headers)[SEQUENCE_ID] == job.sequence
    again = submit(sessions, client, headers=[("TS_Request_Sequence_Id", job.sequence)])
    assert again.sequence == job.sequence and SEQUENCE_START not in dict(again.request.headers)


def test_ids_closed_unknown_or_malformed_are_refused(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    client = Client()
    with pytest.raises(SequenceRefused, match="ts-seq-x is unknown"):
        submit(sessions, client, "ts-seq-x")
    with pytest.raises(BadRequest):
        submit(sessions, client, "bad\nid")
    mine = submit(sessions, client, "mine")  # a client's own new id opens a session
    sessions.close("mine", "was ended by the model's handler")
    assert isinstance(client.answers[mine.request.request_id], SequenceRefused)
    with pytest.raises(SequenceRefused, match="mine was ended"):
        submit(sessions, client, "mine")


def test_a_sessions_jobs_run_one_at_a_time_on_one_worker(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    queue = sessions.queue
    client = Client()
    first = submit(sessions, client, "s")
    second = submit(sessions, client, "s")
    other = submit(sessions, client, "t")
    assert queue.take("a") is first
    assert queue.take("a") is None  # s runs; t is a second session, over a's cap of one
    assert queue.take("b") is other
    assert queue.take("b") is None  # s is a's
    answer(sessions, first, ok())
    assert queue.take("b") is None
    assert queue.take("a") is second


def test_a_collector_waits_for_the_sessions_running_job(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    client = Client()
    first = submit(sessions, client, "s")
    second = submit(sessions, client, "s")
    assert sessions.queue.take("a") is first

    async def a_collects_once_the_first_is_answered() -> list[Job]:
        collector = asyncio.ensure_future(next_batch(sessions.queue, 4, 0, worker="a"))
        await asyncio.sleep(1)
        assert not collector.done()
        answer(sessions, first, ok())
        return await collector

    assert run(loop, a_collects_once_the_first_is_answered()) == [second]


def test_the_caps(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop, max_num=1, batch_size=1, max_workers=1, max_queue=1)
    client = Client()
    submit(sessions, client, "s")
    submit(sessions, client, "s")  # one running (when taken) and one waiting
    with pytest.raises(SequenceRefused, match="maxSequenceJobQueueSize"):
        submit(sessions, client, "s")
    with pytest.raises(SequenceRefused, match="maxNumSequence"):
        submit(sessions, client)
    # TorchServe's count: at least batchSize x maxWorkers sessions; per worker, over minWorkers
    counted = settings(max_num=1, batch_size=4, max_workers=3, min_workers=2)
    assert (counted.max_num, counted.per_worker) == (12, 6)


def test_an_end_answers_the_waiting_jobs(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    queue = sessions.queue
    client = Client()
    last, waiting = submit(sessions, client, "s"), submit(sessions, client, "s")
    assert queue.take("a") is last
    sent = answer(sessions, last, ok((SEQUENCE_END, "s")))
    assert isinstance(sent, Response) and sessions.get("s") is None
    refusal = client.answers[waiting.request.request_id]
    assert isinstance(refusal, SequenceRefused) and "s was ended" in refusal.message
    assert len(queue) == 0 and queue.take("b") is None
    assert submit(sessions, client, "t").sequence == "t"  # a's place is free again
    assert queue.take("a") is not None


def test_an_idle_session_expires_on_the_sweep(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    client = Client()
    job = submit(sessions, client, "s")
    assert sessions.queue.take("a") is job
    run(loop, asyncio.sleep(60))  # running: never idle
    assert sessions.get("s") is not None
    answer(sessions, job, ok())
    run(loop, asyncio.sleep(29))
    assert sessions.get("s") is not None
    run(loop, asyncio.sleep(2))
    assert sessions.get("s") is None
    with pytest.raises(SequenceRefused, match="idle for more than sequenceMaxIdleMSec"):
        submit(sessions, client, "s")
    run(loop, asyncio.sleep(5))  # no session: no sweep left armed
    assert sessions._timer is None


def test_a_session_past_its_time_serves_what_it_queued_then_closes(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop, timeout_ms=10000)
    queue = sessions.queue
    client = Client()
    running, waiting = submit(sessions, client, "s"), submit(sessions, client, "s")
    assert queue.take("a") is running
    run(loop, asyncio.sleep(11))
    with pytest.raises(SequenceRefused, match="sequenceTimeoutMSec"):
        submit(sessions, client, "s")
    answer(sessions, running, ok())
    assert queue.take("a") is waiting
    answer(sessions, waiting, ok())
    assert sessions.get("s") is None
    assert all(isinstance(a, Response) for a in client.answers.values())


def test_a_stream_goes_on_beside_the_sessions_next_job(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    queue = sessions.queue
    client = Client()
    stream = submit(sessions, client, "s")
    assert queue.take("a") is stream
    cancel = submit(sessions, client, "s")
    assert answer(sessions, stream, ok((STREAM_NEXT, "true"))) is None
    assert [dict(c.headers)[SEQUENCE_ID] for c in client.chunks] == ["s"]
    assert stream.request.parts == ()  # sent again without its body
    assert continued(queue, [stream], 1, "a") == [stream, cancel]
    answer(sessions, cancel, ok())
    last = answer(sessions, stream, ok((STREAM_NEXT, "false")))
    assert last is not None and client.answers[stream.request.request_id] is last


def test_a_stream_is_a_plain_answer_without_continuous_batching(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop, continuous=False)
    client = Client()
    job = submit(sessions, client, "s")
    assert sessions.queue.take("a") is job
    assert answer(sessions, job, ok((STREAM_NEXT, "true"))) is not None
    assert client.chunks == []


def test_a_streams_steps_are_carried_and_its_chunks_count_against_the_limit(
    loop: VirtualLoop,
) -> None:
    sessions = sessions_on(loop)
    client = Client()
    stream = submit(sessions, client, "s")
    assert sessions.queue.take("a") is stream
    step = Response(200, "text/plain", b"x" * 400, ((STREAM_NEXT, "true"),))
    assert sessions.answered(stream, step, 1000) is None and stream in sessions.carried
    assert sessions.answered(stream, step, 1000) is None and not stream.done
    assert sessions.answered(stream, step, 1000) is None  # 1,200 bytes in all: ended
    error = client.answers[stream.request.request_id]
    assert isinstance(error, PredictionFailed) and "exceeds max_response_size" in error.message
    assert len(client.chunks) == 2
    assert not sessions.carried and not sessions.streamed  # forgotten once answered


def test_an_open_sessions_worker_is_never_forgotten(
    loop: VirtualLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "MAX_SEQUENCES", 2)  # past it, closed sequences' go
    sessions = sessions_on(loop, max_num=4, min_workers=1)
    client = Client()
    for name in ("s1", "s2", "s3"):
        job = submit(sessions, client, name)
        assert sessions.queue.take("a") is job
        answer(sessions, job, ok())
    later = submit(sessions, client, "s1")
    assert sessions.queue.take("b") is None  # still a's session: its state is there
    assert sessions.queue.take("a") is later


def test_a_session_opened_for_a_refused_request_is_taken_back(loop: VirtualLoop) -> None:
    sessions = sessions_on(loop)
    request = InferenceRequest("r", [], [], 0.0)

    async def opened() -> str:
        return sessions.admit(request, "fresh")[1]

    run(loop, opened())
    sessions.unopen("fresh")  # its request was refused before it was queued
    assert sessions.get("fresh") is None and len(sessions) == 0
    client = Client()
    kept = submit(sessions, client, "kept")
    sessions.unopen("kept")  # a session with a request queued stays
    assert sessions.get("kept") is not None and kept.sequence == "kept"


def test_a_grpc_client_that_does_not_read_holds_a_bounded_stream(loop: VirtualLoop) -> None:
    held = HeldChunks()
    client = Client()
    sessions = sessions_on(loop)
    job = submit(sessions, client, "s")
    held.jobs.append(job)
    for _ in range(MAX_HELD_CHUNKS + 1):
        held.put(ok())
    assert held.chunks.qsize() == MAX_HELD_CHUNKS
    assert isinstance(client.answers[job.request.request_id], RequestTooLarge)
    held.end(None)  # its end still has its place
    assert held.chunks.qsize() == MAX_HELD_CHUNKS + 1
