"""`Deadlines`: one timer per queue answers each job past its response deadline with a
timeout, and never one that was answered, on virtual time (`VirtualLoop`: waiting costs no
real time)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.unit.test_batching import VirtualLoop
from tsctl.errors import InferenceTimeout
from tsctl.server.deadlines import Deadlines
from tsctl.server.request import InferenceRequest, Job, Response

TIMEOUT = 60.0


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    yield virtual
    virtual.close()


def job(loop: asyncio.AbstractEventLoop, arrival: float | None = None) -> Job:
    arrival = loop.time() if arrival is None else arrival
    request = InferenceRequest("r", [], [], arrival)
    future: asyncio.Future[Response] = loop.create_future()
    return Job(request, future, arrival + TIMEOUT)


def answer(deadlines: Deadlines, done: Job) -> None:
    done.answer(Response(200, "text/plain", b"ok"))
    deadlines.answered(done)


def run_until(loop: VirtualLoop, when: float) -> None:
    loop.run_until_complete(asyncio.sleep(when - loop.time()))


def timed_out(each: Job) -> bool:
    return each.future.done() and isinstance(each.future.exception(), InferenceTimeout)


def test_a_job_past_its_deadline_gets_its_timeout_at_the_deadline(loop: VirtualLoop) -> None:
    deadlines = Deadlines()
    late = job(loop)
    deadlines.add(late, TIMEOUT, loop)
    run_until(loop, TIMEOUT - 0.001)
    assert not late.future.done()
    run_until(loop, TIMEOUT + 0.001)
    assert timed_out(late)
    assert "response timeout of 60 s" in str(late.future.exception())
    assert len(deadlines) == 0


def test_answered_jobs_never_time_out_and_the_rest_do_each_at_its_own(loop: VirtualLoop) -> None:
    deadlines = Deadlines()
    jobs = []
    for arrival in range(10):  # one a second
        run_until(loop, float(arrival))
        jobs.append(job(loop))
        deadlines.add(jobs[-1], TIMEOUT, loop)
    for each in jobs[:3] + jobs[5:7]:
        answer(deadlines, each)
    run_until(loop, TIMEOUT + 3.5)  # the deadlines of jobs 0..3 are past
    assert [timed_out(each) for each in jobs[:5]] == [False, False, False, True, False]
    run_until(loop, TIMEOUT + 10)
    assert [timed_out(each) for each in jobs] == [False] * 3 + [True] * 2 + [False] * 2 + [True] * 3
    assert all(each.future.result().status == 200 for each in jobs[:3] + jobs[5:7])
    assert len(deadlines) == 0


def test_a_job_whose_deadline_is_out_of_order_still_times_out_at_its_own(
    loop: VirtualLoop,
) -> None:
    deadlines = Deadlines()
    run_until(loop, 10.0)
    later = job(loop)
    deadlines.add(later, TIMEOUT, loop)
    earlier = job(loop, arrival=2.0)  # arrived first, its body took longer: submitted after
    deadlines.add(earlier, TIMEOUT, loop)
    run_until(loop, TIMEOUT + 2.5)
    assert timed_out(earlier) and not later.future.done()
    run_until(loop, TIMEOUT + 10.5)
    assert timed_out(later)


def test_an_out_of_order_job_answered_in_time_does_not_time_out(loop: VirtualLoop) -> None:
    deadlines = Deadlines()
    run_until(loop, 10.0)
    later = job(loop)
    deadlines.add(later, TIMEOUT, loop)
    earlier = job(loop, arrival=2.0)
    deadlines.add(earlier, TIMEOUT, loop)
    answer(deadlines, earlier)
    run_until(loop, TIMEOUT + 20)
    assert earlier.future.result().status == 200
    assert timed_out(later)


def test_answered_jobs_behind_a_held_one_are_not_kept(loop: VirtualLoop) -> None:
    deadlines = Deadlines()
    held = job(loop)  # a worker holds it: nothing behind it leaves from the front
    deadlines.add(held, TIMEOUT, loop)
    for _ in range(10_000):
        each = job(loop)
        deadlines.add(each, TIMEOUT, loop)
        answer(deadlines, each)
    assert len(deadlines) <= 2 + 64
    run_until(loop, TIMEOUT + 1)
    assert timed_out(held) and len(deadlines) == 0


def test_a_renewed_job_times_out_a_timeout_after_its_renewal_and_holds_up_no_other(
    loop: VirtualLoop,
) -> None:
    """A continuous stream's step: the response timeout counts afresh from when it is sent,
    and the jobs queued after it still time out at their own deadlines."""
    deadlines = Deadlines()
    stream, later = job(loop), job(loop, loop.time() + 10)
    deadlines.add(stream, TIMEOUT, loop)
    deadlines.add(later, TIMEOUT, loop)
    run_until(loop, 50)
    deadlines.renew(stream, loop)  # a new step at 50 s: due at 110 s
    run_until(loop, TIMEOUT + 10 + 0.001)
    assert timed_out(later) and not stream.future.done()
    run_until(loop, 50 + TIMEOUT - 0.001)
    assert not stream.future.done()
    run_until(loop, 50 + TIMEOUT + 0.001)
    assert timed_out(stream)


def test_a_renewed_job_answered_in_time_never_times_out(loop: VirtualLoop) -> None:
    deadlines = Deadlines()
    stream = job(loop)
    deadlines.add(stream, TIMEOUT, loop)
    run_until(loop, 30)
    deadlines.renew(stream, loop)
    run_until(loop, 80)
    answer(deadlines, stream)
    run_until(loop, 200)
    assert stream.future.result().body == b"ok"
    assert len(deadlines) == 0
