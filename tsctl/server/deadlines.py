"""The response deadlines of one model version's jobs: one timer for the lot. Event-loop only.

A job must get its answer within the model's response timeout of its arrival, queue time
included; past it, it is answered with `InferenceTimeout` wherever it is (queued or in a
worker's batch). A timer per job (`loop.call_at`, then `cancel` when the answer comes) costs a
`TimerHandle` and a heap push per request and leaves the loop's heap full of cancelled ones.
Jobs of one model version mostly arrive in the order of their deadlines (the timeout is the
model's), so `Deadlines` keeps them in that order in a deque and arms one timer, for the first
deadline; when it fires, the jobs answered meanwhile are dropped, the ones past their deadline
get their timeout, and the timer is armed for the next. A job whose deadline comes before the
last one's (its body took longer to arrive than a later request's, or the timeout was
lowered) gets a timer of its own, as before.

A step of a continuous-batching stream (`tsctl.server.sessions`) has the response timeout of
its own, from when it is sent (TorchServe's timeout is per step): `renew` moves its deadline
and gives it a timer of its own; its entry in the deque is skipped from then on.

Answered jobs leave the deque from its front as they are answered (`answered`); when a job
held long in a worker keeps older answered ones in, the deque is compacted once it holds more
than twice the jobs still waiting, so it never holds many more jobs than are in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque

from tsctl.errors import InferenceTimeout
from tsctl.server.request import Job

#: answered jobs the deque may hold beyond twice the waiting ones before it is compacted
_SLACK = 64


def expire(job: Job, timeout: float) -> None:
    """A job's deadline passed: answer it with a timeout, wherever it is."""
    job.answer(InferenceTimeout(f"no answer within the response timeout of {timeout:g} s"))


class Deadlines:
    """The deadlines of a queue's jobs, in order, and the one timer for the earliest."""

    def __init__(self) -> None:
        self._jobs: deque[tuple[Job, float]] = deque()  # (job, its timeout), by deadline
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = 0  # added and not answered
        self._timeout = 0.0  # the model's response timeout (the last `add`'s)

    def __len__(self) -> int:
        """Jobs held (waiting, or answered and not dropped yet): for tests."""
        return len(self._jobs)

    def add(self, job: Job, timeout: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Answer `job` with a timeout at `job.deadline` unless it is answered before
        (`answered` says so). `loop`: the running loop unless given (looked up only when a
        timer is made: most jobs join a deque that already has one)."""
        self._timeout = timeout
        jobs = self._jobs
        if jobs and job.deadline < jobs[-1][0].deadline:  # out of order: a timer of its own
            loop = loop or asyncio.get_running_loop()
            job.timer = loop.call_at(job.deadline, expire, job, timeout)
            return
        jobs.append((job, timeout))
        self._waiting += 1
        if self._timer is None:
            loop = loop or asyncio.get_running_loop()
            self._timer = loop.call_at(job.deadline, self._sweep, loop)

    def renew(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """`job` starts a new step now: its deadline is the response timeout from now, on a
        timer of its own (its entry in the deque, if any, no longer counts)."""
        if job.timer is not None:
            job.timer.cancel()
        else:
            self._waiting -= 1
        job.deadline = loop.time() + self._timeout
        job.timer = loop.call_at(job.deadline, expire, job, self._timeout)

    def answered(self, job: Job) -> None:
        """`job` has its answer (or its client is gone): it no longer needs its deadline."""
        if job.timer is not None:
            job.timer.cancel()
            return
        self._waiting -= 1
        jobs = self._jobs
        while jobs and jobs[0][0].done:
            jobs.popleft()
        if len(jobs) > 2 * self._waiting + _SLACK:
            self._jobs = deque(entry for entry in jobs if not entry[0].done)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        # a job answered here may call `answered` at once, which drops answered jobs from the
        # front or compacts the deque: it is read afresh each time, and a job leaves it first
        while self._jobs:
            job, timeout = self._jobs[0]
            if job.timer is not None and not job.done:  # renewed: its own timer has it
                self._jobs.popleft()
                continue
            if not job.done and job.deadline > now:
                self._timer = loop.call_at(job.deadline, self._sweep, loop)
                return
            self._jobs.popleft()
            expire(job, timeout)
