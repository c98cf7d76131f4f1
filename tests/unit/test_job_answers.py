"""A job without a future (a REST exchange's) gets its answer by a direct call, at once,
from whatever answers it: its deadline, the queue closing, a client that went away. The
queue's bookkeeping (`ModelQueue.settle`) runs once, before the answer, however many try to
answer it; an error in the receiver is logged, not raised into the one answering. Virtual
time (`VirtualLoop`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from tests.unit.test_batching import Conn, VirtualLoop
from tsctl.errors import InferenceTimeout, ServiceUnavailable
from tsctl.server.batching import ModelQueue
from tsctl.server.request import ClientGone, InferenceRequest, Job, Response

TIMEOUT = 60.0


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    yield virtual
    virtual.close()


class Receiver:
    """What a REST exchange is to its job: it records what it was answered, and what the
    queue knew of the job at that moment."""

    def __init__(self, queue: ModelQueue) -> None:
        self.queue = queue
        self.outcomes: list[Response | BaseException] = []
        self.held_then: list[int] = []

    def __call__(self, outcome: Response | BaseException) -> None:
        self.outcomes.append(outcome)
        self.held_then.append(len(self.queue.deadlines))


def queued(loop: VirtualLoop, queue: ModelQueue, source: object = None) -> tuple[Job, Receiver]:
    receiver = Receiver(queue)
    request = InferenceRequest("r", [], [], loop.time())
    job = Job(
        request,
        None,
        loop.time() + TIMEOUT,
        source,
        on_answer=receiver,
        settle=queue.settle,
    )
    queue.put(job)
    queue.deadlines.add(job, TIMEOUT, loop)
    return job, receiver


def test_an_answer_is_delivered_at_once_after_the_queues_bookkeeping(loop: VirtualLoop) -> None:
    queue = ModelQueue(10, clock=loop.time)
    source = Conn()
    job, receiver = queued(loop, queue, source)
    assert queue.likely_arrivals(loop.time()) == 0  # its one request is in flight
    answer = Response(200, "application/json", b"{}")
    job.answer(answer)
    assert job.done and receiver.outcomes == [answer]
    assert receiver.held_then == [0]  # settled before it was answered
    job.answer(Response(500, "", b""))  # a second answer (a late deadline) is dropped
    job.answer(ClientGone())
    assert receiver.outcomes == [answer]
    assert queue.take() is None  # answered jobs are never sent to a worker


def test_a_client_gone_before_its_batch_is_dropped(loop: VirtualLoop) -> None:
    queue = ModelQueue(10, clock=loop.time)
    gone, gone_receiver = queued(loop, queue)
    live, _ = queued(loop, queue)
    gone.answer(ClientGone())
    assert isinstance(gone_receiver.outcomes[0], ClientGone)
    assert queue.take() is live


def test_deadlines_answer_each_late_job_directly_and_once(loop: VirtualLoop) -> None:
    queue = ModelQueue(100, clock=loop.time)
    jobs = [queued(loop, queue) for _ in range(5)]
    jobs[1][0].answer(Response(200, "", b"ok"))
    loop.run_until_complete(asyncio.sleep(TIMEOUT + 1))
    kinds = [[type(o) for o in receiver.outcomes] for _, receiver in jobs]
    assert kinds == [
        [InferenceTimeout],
        [Response],
        [InferenceTimeout],
        [InferenceTimeout],
        [InferenceTimeout],
    ]
    assert len(queue.deadlines) == 0


def test_closing_the_queue_answers_its_waiting_jobs(loop: VirtualLoop) -> None:
    queue = ModelQueue(10, clock=loop.time)
    jobs = [queued(loop, queue) for _ in range(3)]
    error = ServiceUnavailable("unregistered")
    queue.drop_all(error)
    assert all(receiver.outcomes == [error] for _, receiver in jobs)
    assert len(queue.deadlines) == 0


def test_an_error_in_the_receiver_is_logged_not_raised(
    loop: VirtualLoop, caplog: pytest.LogCaptureFixture
) -> None:
    queue = ModelQueue(10, clock=loop.time)
    request = InferenceRequest("r-broken", [], [], loop.time())

    def broken(outcome: Response | BaseException) -> None:
        raise RuntimeError("a bug in the exchange")

    job = Job(request, None, loop.time() + TIMEOUT, on_answer=broken, settle=queue.settle)
    queue.put(job)
    queue.deadlines.add(job, TIMEOUT, loop)
    job.answer(Response(200, "", b""))  # does not raise
    assert job.done
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "r-broken" in record.getMessage()
    caplog.clear()
