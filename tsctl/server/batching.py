"""Per-model job queue and batch collection. Runs on the daemon's event loop only.

Semantics are TorchServe's: an idle worker takes the first waiting job, then waits at most
`max_batch_delay` for up to `batch_size` jobs, then sends the batch. One difference: it stops
waiting as soon as no more requests are likely to come. The queue keeps, per client
connection ("source": an HTTP/1.1 connection, or a gRPC peer that multiplexes many calls),
how many requests it has had in flight at once lately and how many it has now; the
difference is what it is likely to send soon (a closed-loop client sends again as soon as it
is answered). When no source is expected to send, waiting can only add latency (a lone client
at concurrency 1 gets its answer without the `max_batch_delay` penalty TorchServe charges).

A source is forgotten, whatever the batch size, once nothing of it is in flight and either
its connection closed (a source with `when_closed`, an `http1.Connection`, tells the queue;
one with `closed()` is asked whenever the likely arrivals are counted) or it sent nothing for
`SOURCE_WINDOW` (looked for at most once a window, on `put`, `answered` and the count, which
skips a source idle past the window at once): the queue holds no closed connection, and at most
the sources of the last window or so. A closed connection still owed answers is expected to send
nothing more.

`drop_all` closes the queue for good (its model version is gone): waiting jobs fail with its
error, and so does a later `put`, at once (a request that found the model just before it was
unregistered gets its error, not the response timeout).

`DefaultBatching` is this module's collection as a `BatchingStrategy` (the plugin interface,
`tsctl.plugins.api`): the strategy of every model whose model-config.yaml names no other. A
plugin strategy chooses jobs itself with the queue's public methods (`take`, `take_job`,
`waiting`, `wait_for_job`, `wait_for_more`, `likely_arrivals`, `requeue_front`, `clock`); for
one, the queue records what each worker's collector took (`record_takes`, `taken_by`), so
that the pool can fail or give back the jobs of a collector that raised or went away.

Sequences: a job with a `sequence` (gRPC `sequence_id`, a stateful session) runs only on the
worker that took its sequence's first job. For a model with stateful sessions
(`tsctl.server.sessions`, the queue's `sessions`), a session's next job also waits until its
job before is answered (or streams on: `sequence_free`), and a worker takes at most
`sequence_cap` sessions; `drop_sequence` answers the waiting jobs of a session that closed.

Nothing here blocks: every method is either plain or a coroutine that awaits futures.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tsctl.errors import QueueFull
from tsctl.plugins.api import BatchingStrategy
from tsctl.server.deadlines import Deadlines
from tsctl.server.request import Job

if TYPE_CHECKING:
    from tsctl.server.sessions import Sessions

#: how long an answered connection counts as "about to send again" (seconds)
SOURCE_WINDOW = 1.0
#: sequences remembered for stickiness; the least recently used is forgotten past this
MAX_SEQUENCES = 10000
#: how long a worker's serving loop waits before asking a batching strategy that failed
#: again (seconds; `tsctl.server.workers.pool` and `.inflight`)
STRATEGY_PAUSE = 0.1


class ModelQueue:
    """A bounded FIFO of jobs for one model version, with arrival hints for batching.

    `clock` is the event loop's clock (`time.monotonic`, which asyncio's `loop.time()` reads);
    it times the sources and `next_batch`'s `max_batch_delay`. Tests pass a virtual one."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        self._jobs: deque[Job] = deque()
        self._idle_waiters: deque[asyncio.Future[None]] = deque()
        self._fill_waiters: deque[asyncio.Future[None]] = deque()
        self._sources: dict[Hashable, _Source] = {}
        #: which worker serves each sequence (least recently used first)
        self._owners: OrderedDict[str, Hashable] = OrderedDict()
        self._pinned = 0  # queued jobs that belong to a sequence
        #: each session's job a worker runs now: its next one waits (one at a time, in order)
        self._running: dict[str, Job] = {}
        #: how many sequences each worker serves, and the most it may (0: no limit)
        self._owned: dict[Hashable, int] = {}
        self.sequence_cap = 0
        #: the model's stateful sessions, if it has them (`tsctl.server.sessions`)
        self.sessions: Sessions | None = None
        self._pruned = 0.0  # when idle sources were last looked for
        self._polled = 0  # sources without `when_closed`: asked `closed()` when counted
        self._closed: Exception | None = None  # `drop_all`'s error: the queue is closed
        #: what each worker's collector took and has not handed over, when recorded
        #: (`record_takes`: a plugin strategy's queue); None: not recorded
        self._held: dict[Hashable | None, list[Job]] | None = None
        #: the response deadlines of its jobs, queued or running (`tsctl.server.inference`)
        self.deadlines = Deadlines()

    def __len__(self) -> int:
        return len(self._jobs)

    def tracked_sources(self) -> int:
        """How many sources the queue remembers (for tests and the soak)."""
        return len(self._sources)

    def put(self, job: Job) -> None:
        if self._closed is not None:
            raise copy.copy(self._closed).with_traceback(None)
        if len(self._jobs) >= self.capacity:
            raise QueueFull(
                f"the job queue is full ({self.capacity} requests waiting); retry later"
            )
        self._jobs.append(job)
        if job.source is not None:
            now = self.clock()
            record = self._sources.get(job.source)
            if record is None:
                record = self._sources[job.source] = _Source()
                when_closed = getattr(job.source, "when_closed", None)
                if callable(when_closed):
                    when_closed(self.forget)
                else:
                    record.polled = True
                    self._polled += 1
            record.in_flight += 1
            record.peak = max(record.peak, record.in_flight)
            record.last = now
            if now - self._pruned > SOURCE_WINDOW:
                self._prune(now)
        if job.sequence is None:
            self._wake()
        else:  # only its worker may take it: let every collector look
            self._pinned += 1
            if self.sessions is not None:
                self.sessions.queued(job)
            self._wake(everyone=True)

    def requeue_front(self, jobs: list[Job]) -> None:
        """Give back jobs a collector took but did not send (it was cancelled), in their
        order, before every waiting job; answered ones are dropped."""
        if self._held is not None:
            for held in self._held.values():
                held[:] = [job for job in held if job not in jobs]
        for job in reversed(jobs):
            if not job.done:
                self._jobs.appendleft(job)
                if job.sequence is not None:
                    self._pinned += 1
                    if self._running.get(job.sequence) is job:
                        del self._running[job.sequence]
        if self._jobs:
            self._wake(everyone=self._pinned > 0)

    def answered(self, source: Hashable | None, now: float) -> None:
        """A job from `source` got its answer at `now`."""
        record = self._sources.get(source) if source is not None else None
        if record is not None:
            record.in_flight = max(0, record.in_flight - 1)
            record.last = now
            if record.in_flight == 0 and _closed(source):
                self._drop(source)
        if now - self._pruned > SOURCE_WINDOW:
            self._prune(now)

    def settle(self, job: Job) -> None:
        """`job` has its answer (or its client is gone): drop its deadline, and count the
        answer for its source."""
        self.deadlines.answered(job)
        self.answered(job.source, self.clock())
        if job.sequence is not None:
            self._sequence_settled(job)

    def _sequence_settled(self, job: Job) -> None:
        """A job of a sequence has its answer: the sequence's next job may run."""
        sequence = job.sequence or ""
        if self._running.get(sequence) is job:
            del self._running[sequence]
            if self._pinned:
                self._wake(everyone=True)
        if self.sessions is not None:
            self.sessions.settled(job)

    def sequence_free(self, job: Job) -> None:
        """`job` still runs (a continuous batch streams it) but its sequence's next job may
        run beside it."""
        sequence = job.sequence or ""
        if self._running.get(sequence) is job:
            del self._running[sequence]
            if self._pinned:
                self._wake(everyone=True)

    def forget(self, source: Hashable) -> None:
        """`source`'s connection closed: forget it (once its last answer is in, if it still
        waits for some: `answered` asks `closed()`)."""
        record = self._sources.get(source)
        if record is not None and record.in_flight == 0:
            self._drop(source)
        elif record is not None:
            record.peak = record.in_flight  # it sends nothing more

    def likely_arrivals(self, now: float) -> int:
        """Requests the active, open sources are likely to send soon: for each, how many it
        has had in flight at once lately, less how many it has in flight now."""
        if self._polled or now - self._pruned > SOURCE_WINDOW:
            self._prune(now)  # sources that cannot tell of their close are asked each time
        quiet = now - SOURCE_WINDOW  # a source idle past the window counts as pruned
        total = 0
        for record in self._sources.values():
            if record.peak > record.in_flight and record.last >= quiet:
                total += record.peak - record.in_flight
        return total

    def _prune(self, now: float) -> None:
        """Forget the sources that are idle past the window or closed; one still waiting on
        answers keeps counting from what it has in flight (its old peak is forgotten)."""
        self._pruned = now
        stale = [
            source
            for source, record in self._sources.items()
            if now - record.last > SOURCE_WINDOW or _closed(source)
        ]
        for source in stale:
            record = self._sources[source]
            if record.in_flight == 0:
                self._drop(source)
            else:
                record.peak = record.in_flight

    def _drop(self, source: Hashable) -> None:
        self._polled -= self._sources.pop(source).polled

    def take(self, worker: Hashable | None = None) -> Job | None:
        """The oldest live job `worker` may run, skipping ones already answered (timed out,
        client gone) and ones of a sequence another worker serves."""
        if not self._pinned:  # the common case: plain FIFO
            while self._jobs:
                job = self._jobs.popleft()
                if not job.done:
                    if self._held is not None:
                        self._held.setdefault(worker, []).append(job)
                    return job
            return None
        index = 0
        while index < len(self._jobs):
            job = self._jobs[index]
            if job.done:
                del self._jobs[index]
                self._pinned -= job.sequence is not None
                continue
            if job.sequence is not None:
                if not self._may_take(job.sequence, worker):
                    index += 1
                    continue
                self._own(job.sequence, worker)
                if self.sessions is not None:
                    self._running[job.sequence] = job
                self._pinned -= 1
            del self._jobs[index]
            if self._held is not None:
                self._held.setdefault(worker, []).append(job)
            return job
        return None

    def take_job(self, job: Job, worker: Hashable | None = None) -> bool:
        """Take `job` (one of `waiting()`) out of the queue, if it is still waiting, not
        answered, and `worker` may run it (not a job of a sequence another worker serves);
        whether it was taken. For a strategy that chooses jobs out of arrival order."""
        if job.done:
            return False
        if job.sequence is not None and not self._may_take(job.sequence, worker):
            return False
        try:
            self._jobs.remove(job)  # by identity: jobs compare as themselves
        except ValueError:
            return False  # taken by another collector, or never queued here
        if job.sequence is not None:
            self._own(job.sequence, worker)
            if self.sessions is not None:
                self._running[job.sequence] = job
            self._pinned -= 1
        if self._held is not None:
            self._held.setdefault(worker, []).append(job)
        return True

    def waiting(self, worker: Hashable | None = None) -> list[Job]:
        """A snapshot of the jobs waiting, oldest first: those not answered yet that `worker`
        may run (a sequence another worker serves is left out). Taking one is `take_job`."""
        return [
            job
            for job in self._jobs
            if not job.done and (job.sequence is None or self._may_take(job.sequence, worker))
        ]

    def _may_take(self, sequence: str, worker: Hashable | None) -> bool:
        """Whether `worker` may run the next job of `sequence` now: it is `worker`'s sequence,
        or nobody's and `worker` serves fewer than `sequence_cap` sequences; and, for a
        session (a model with `sessions`), none of its jobs runs."""
        if self.sessions is not None:
            running = self._running.get(sequence)
            if running is not None and not running.done:
                return False
        owner = self._owners.get(sequence)
        if owner is None:
            cap = self.sequence_cap
            return not cap or worker is None or self._owned.get(worker, 0) < cap
        return owner is worker

    def record_takes(self) -> None:
        """Record from now on which jobs each worker's collector takes (`taken_by`). The pool
        turns it on for a plugin strategy: jobs of a strategy that raised are failed, jobs of
        one that was cancelled or kept some are given back. Off for the default strategy."""
        if self._held is None:
            self._held = {}

    def taken_by(self, worker: Hashable | None) -> list[Job]:
        """The jobs `worker`'s collector took (`take`, `take_job`) and did not give back
        (`requeue_front`) since it was last asked, oldest take first; forgotten now. Empty
        unless `record_takes` is on."""
        if self._held is None:
            return []
        return self._held.pop(worker, [])

    def _own(self, sequence: str, worker: Hashable | None) -> None:
        if worker is None:
            return
        if self._owners.get(sequence) is None:
            self._owned[worker] = self._owned.get(worker, 0) + 1
        self._owners[sequence] = worker
        self._owners.move_to_end(sequence)
        # a model with sessions forgets a sequence when its session closes (`drop_sequence`);
        # the sessions open are capped by maxNumSequence, and none may move worker
        while self.sessions is None and len(self._owners) > MAX_SEQUENCES:
            self._disown(self._owners.popitem(last=False)[1])

    def _disown(self, worker: Hashable) -> None:
        count = self._owned.get(worker, 0) - 1
        if count > 0:
            self._owned[worker] = count
        else:
            self._owned.pop(worker, None)

    def drop_sequence(self, sequence: str, error: Exception) -> None:
        """`sequence` is closed (a session that ended or expired): its waiting jobs are
        answered with `error`, and its worker serves it no more."""
        dropped = [job for job in self._jobs if job.sequence == sequence]
        if dropped:
            self._jobs = deque(job for job in self._jobs if job.sequence != sequence)
            self._pinned -= len(dropped)
        owner = self._owners.pop(sequence, None)
        if owner is not None:
            self._disown(owner)
        self._running.pop(sequence, None)
        for job in dropped:
            job.answer(copy.copy(error).with_traceback(None))
        if self._pinned:
            self._wake(everyone=True)

    def release(self, worker: Hashable) -> None:
        """`worker` is gone: its sequences may move to another worker, and jobs its collector
        took and never handed over (`taken_by`) go back to the front of the queue."""
        for sequence in [s for s, w in self._owners.items() if w is worker]:
            del self._owners[sequence]
        self._owned.pop(worker, None)
        if self._held is not None and self._held.get(worker):
            self.requeue_front(self._held.pop(worker))
        if self._pinned:
            self._wake(everyone=True)

    def drop_all(self, error: Exception) -> None:
        """Close the queue for good: every waiting job fails with `error`, and so does every
        later `put` (raising a copy of it)."""
        self._closed = error
        jobs, self._jobs, self._pinned = self._jobs, deque(), 0
        for job in jobs:
            job.answer(error)

    def _wake(self, everyone: bool = False) -> None:
        for waiters in (self._fill_waiters, self._idle_waiters):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    if not everyone:
                        return

    async def wait_for_job(self) -> None:
        """Until a job may be waiting (an idle collector's wait)."""
        await self._wait(self._idle_waiters, None)

    async def wait_for_more(self, timeout: float) -> None:
        """Until another job arrives or `timeout` passes (a collector filling a batch)."""
        await self._wait(self._fill_waiters, timeout)

    async def _wait(self, waiters: deque[asyncio.Future[None]], timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done():
                waiter.cancel()
        return bool(self._jobs)


@dataclass
class _Source:
    """What the batcher knows of one client connection (an HTTP/1.1 connection, a gRPC peer)."""

    in_flight: int = 0
    peak: int = 0  # the most it has had in flight at once, lately
    last: float = 0.0
    polled: bool = False  # no `when_closed`: whether it closed is asked (`_closed`)


def _closed(source: Hashable) -> bool:
    """A source that can tell (an `http1.Connection`) and whose connection is closed."""
    closed = getattr(source, "closed", None)
    return bool(closed()) if callable(closed) else False


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def next_batch(
    queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable | None = None
) -> list[Job]:
    """Collect the next batch for an idle `worker` (see the module docstring).

    Safe to cancel at any point: jobs already taken go back to the front of the queue.
    """
    clock = queue.clock
    while (first := queue.take(worker)) is None:
        await queue.wait_for_job()
    batch = [first]
    try:
        deadline = clock() + max_delay_ms / 1000
        while len(batch) < batch_size:
            job = queue.take(worker)
            if job is not None:
                batch.append(job)
                continue
            now = clock()
            if now >= deadline or not queue.likely_arrivals(now):
                break
            await queue.wait_for_more(deadline - now)
    except asyncio.CancelledError:
        queue.requeue_front(batch)
        raise
    return batch


def ready_batch(queue: ModelQueue, batch_size: int, worker: Hashable | None = None) -> list[Job]:
    """The batch `next_batch` would send at once, without waiting: `batch_size` live jobs that
    `worker` may run, taken from the queue; or none taken, when fewer are waiting (then
    `next_batch` decides how long to wait for more). A worker's serving loop sends it while
    it answers the batch before (`WorkerPool._serve`)."""
    if len(queue) < batch_size:
        return []
    batch: list[Job] = []
    while len(batch) < batch_size and (job := queue.take(worker)) is not None:
        batch.append(job)
    if len(batch) < batch_size:
        queue.requeue_front(batch)
        return []
    return batch


class DefaultBatching(BatchingStrategy):
    """The built-in strategy (a model's unless its model-config.yaml names another): TorchServe's
    batching with tsctl's early send when no client is likely to send soon (`next_batch`), and
    a full batch sent as a worker's result arrives (`ready_batch`). It takes no options.

    Its methods are this module's functions themselves, so the pool's call costs the one
    Python call per batch it did before strategies were pluggable."""

    name = "default"
    next_batch = staticmethod(next_batch)
    ready_batch = staticmethod(ready_batch)

    def configure(self, options: Mapping[str, Any]) -> DefaultBatching:
        if options:
            names = ", ".join(sorted(str(name) for name in options))
            raise ValueError(f"the default batching strategy takes no options (given: {names})")
        return self
