"""`ModelQueue` and `next_batch` on virtual time: what a collector takes, and when it stops
waiting (batch full, `max_batch_delay` over, or no client likely to send soon).

The event loop here never sleeps: when nothing is ready, its clock jumps to the next timer
(`VirtualLoop`), and the queue reads the same clock, so a 100 ms wait costs no real time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tsctl.errors import QueueFull, ServiceUnavailable
from tsctl.server import batching
from tsctl.server.batching import SOURCE_WINDOW, ModelQueue, next_batch
from tsctl.server.request import ClientGone, InferenceRequest, Job, Response

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; a wait that would block advances the virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events: list[Any] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: nothing is ready and no timer is set")
        self.now += timeout
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` only moves when everything waits on a timer."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    yield virtual
    virtual.close()


def run(loop: VirtualLoop, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coro)


class Conn:
    """A source that can tell whether it is closed, as an `http1.Connection` can."""

    def __init__(self) -> None:
        self.is_closed = False

    def closed(self) -> bool:
        return self.is_closed


_ids = iter(range(1, 1 << 30))


def job(loop: asyncio.AbstractEventLoop, source: object = None, sequence: str | None = None) -> Job:
    request = InferenceRequest(f"r{next(_ids)}", [], [], loop.time())
    future: asyncio.Future[Response] = loop.create_future()
    return Job(request, future, loop.time() + 60, source=source, sequence=sequence)


def queue_on(loop: VirtualLoop, capacity: int = 100) -> ModelQueue:
    return ModelQueue(capacity, clock=loop.time)


class Clock:
    """A clock the test moves by hand (for what needs no event loop)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def busy_source(queue: ModelQueue, loop: VirtualLoop, peak: int, in_flight: int) -> Conn:
    """A source that has had `peak` requests in flight lately and has `in_flight` now."""
    source = Conn()
    for _ in range(peak):
        queue.put(job(loop, source))
    while queue.take() is not None:
        pass
    for _ in range(peak - in_flight):
        queue.answered(source, loop.time())
    assert queue.likely_arrivals(loop.time()) == peak - in_flight
    return source


# --- next_batch


def test_the_first_job_is_taken_at_once(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    first = job(loop)
    queue.put(first)
    assert run(loop, next_batch(queue, 8, 100)) == [first]
    assert loop.time() == 0.0  # no client is likely to send: no max_batch_delay wait


def test_an_idle_collector_takes_the_first_job_when_it_arrives(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    arriving = job(loop)
    loop.call_later(5.0, queue.put, arriving)
    assert run(loop, next_batch(queue, 8, 100)) == [arriving]
    assert loop.time() == pytest.approx(5.0)


def test_the_batch_fills_up_to_batch_size_in_order(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    jobs = [job(loop) for _ in range(6)]
    for each in jobs:
        queue.put(each)
    assert run(loop, next_batch(queue, 4, 100)) == jobs[:4]
    assert len(queue) == 2 and loop.time() == 0.0
    assert run(loop, next_batch(queue, 4, 100)) == jobs[4:]


def test_it_waits_for_likely_arrivals_and_stops_at_max_batch_delay(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = busy_source(queue, loop, peak=4, in_flight=1)  # likely to send 3 more
    first, second = job(loop, source), job(loop, source)
    queue.put(first)
    loop.call_later(0.03, queue.put, second)
    late = job(loop, source)
    loop.call_later(0.5, queue.put, late)
    assert run(loop, next_batch(queue, 8, 100)) == [first, second]
    assert loop.time() == pytest.approx(0.1)  # max_batch_delay, though more was expected
    assert queue.take() is None  # `late` has not arrived yet


def test_a_full_batch_does_not_wait_out_the_delay(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = busy_source(queue, loop, peak=5, in_flight=0)
    jobs = [job(loop, source) for _ in range(3)]
    queue.put(jobs[0])
    loop.call_later(0.01, queue.put, jobs[1])
    loop.call_later(0.02, queue.put, jobs[2])
    assert run(loop, next_batch(queue, 3, 100)) == jobs
    assert loop.time() == pytest.approx(0.02)


def test_it_stops_early_once_no_source_is_likely_to_send(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = busy_source(queue, loop, peak=2, in_flight=0)
    first, second = job(loop, source), job(loop, source)
    queue.put(first)
    loop.call_later(0.02, queue.put, second)  # the source's last expected request
    assert run(loop, next_batch(queue, 8, 100)) == [first, second]
    assert loop.time() == pytest.approx(0.02)  # not 0.1: nothing more was expected


def test_a_lone_client_at_concurrency_one_never_waits(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = Conn()
    for n in range(3):
        queue.put(job(loop, source))
        assert len(run(loop, next_batch(queue, 8, 1000))) == 1
        queue.answered(source, loop.time())
        assert loop.time() == 0.0, n


def test_jobs_already_answered_are_skipped(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    gone, live = job(loop), job(loop)
    queue.put(gone)
    queue.put(live)
    gone.answer(ClientGone())  # timed out, or its client went away
    assert gone.future is not None and isinstance(gone.future.exception(), ClientGone)
    assert run(loop, next_batch(queue, 8, 100)) == [live]


def test_cancelling_a_collector_gives_its_jobs_back_in_order(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    busy_source(queue, loop, peak=3, in_flight=0)
    jobs = [job(loop) for _ in range(2)]
    for each in jobs:
        queue.put(each)
    behind = job(loop)

    async def cancel_while_filling() -> None:
        task = asyncio.ensure_future(next_batch(queue, 8, 100))
        await asyncio.sleep(0.05)  # virtual: the collector holds both jobs and waits
        queue.put(behind)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop, cancel_while_filling())
    assert [queue.take(), queue.take(), queue.take()] == [*jobs, behind]


def test_one_job_wakes_one_idle_collector(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    jobs = [job(loop), job(loop)]

    async def two_collectors() -> list[list[Job]]:
        a = asyncio.ensure_future(next_batch(queue, 1, 100, worker="a"))
        b = asyncio.ensure_future(next_batch(queue, 1, 100, worker="b"))
        await asyncio.sleep(1)
        queue.put(jobs[0])
        await asyncio.sleep(1)
        assert a.done() != b.done()  # exactly one of them woke and took it
        queue.put(jobs[1])
        return [await a, await b]

    assert run(loop, two_collectors()) == [[jobs[0]], [jobs[1]]]


# --- the queue


def test_a_full_queue_raises_queue_full(loop: VirtualLoop) -> None:
    queue = queue_on(loop, capacity=2)
    queue.put(job(loop))
    queue.put(job(loop))
    with pytest.raises(QueueFull, match=r"full \(2 requests waiting\)") as caught:
        queue.put(job(loop))
    assert caught.value.http_status == 503 and caught.value.headers == {"Retry-After": "1"}
    assert len(queue) == 2
    queue.take()
    queue.put(job(loop))  # room again


def test_drop_all_fails_every_waiting_job(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    jobs = [job(loop), job(loop, sequence="s")]
    for each in jobs:
        queue.put(each)
    jobs[0].answer(Response(200, "", b""))  # answered already: left alone
    error = RuntimeError("the model is unloading")
    queue.drop_all(error)
    assert len(queue) == 0 and queue.take() is None
    assert jobs[0].future.result().status == 200
    assert jobs[1].future.exception() is error


def test_a_dropped_queue_refuses_new_jobs_at_once(loop: VirtualLoop) -> None:
    """A request that found its model just before it was unregistered: its `put` lands on
    the dropped queue and must fail at once, not wait out the response timeout."""
    queue = queue_on(loop)
    queue.drop_all(ServiceUnavailable("model m was unloaded"))
    late = job(loop)
    with pytest.raises(ServiceUnavailable, match="model m was unloaded"):
        queue.put(late)
    assert len(queue) == 0 and not late.future.done()


# --- sources: what the batcher expects clients to send


def test_likely_arrivals_is_peak_less_in_flight_per_source(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    a, b = Conn(), "grpc-peer"  # a gRPC peer cannot tell whether it is closed
    for source in (a, a, a, b, b):
        queue.put(job(loop, source))
    assert queue.likely_arrivals(loop.time()) == 0  # everything is in flight
    queue.answered(a, loop.time())
    queue.answered(b, loop.time())
    assert queue.likely_arrivals(loop.time()) == 2
    queue.answered(None, loop.time())  # no source: nothing to count
    queue.answered(Conn(), loop.time())  # one never seen
    assert queue.likely_arrivals(loop.time()) == 2


def test_an_idle_source_is_forgotten_after_the_window(loop: VirtualLoop) -> None:
    clock = Clock()
    queue = ModelQueue(10, clock=clock)
    source = Conn()
    for _ in range(3):
        queue.put(job(loop, source))
    for _ in range(3):
        queue.answered(source, clock.now)
    clock.now += SOURCE_WINDOW  # not past it yet
    assert queue.likely_arrivals(clock.now) == 3
    clock.now += 0.001
    assert queue.likely_arrivals(clock.now) == 0
    queue.put(job(loop, source))  # back: it starts over, its old peak forgotten
    queue.answered(source, clock.now)
    assert queue.likely_arrivals(clock.now) == 1


def test_a_quiet_source_still_waiting_keeps_counting_from_what_it_has_in_flight(
    loop: VirtualLoop,
) -> None:
    clock = Clock()
    queue = ModelQueue(10, clock=clock)
    source = Conn()
    for _ in range(4):
        queue.put(job(loop, source))
    queue.answered(source, clock.now)
    assert queue.likely_arrivals(clock.now) == 1
    clock.now += SOURCE_WINDOW + 1  # three answers still owed, none sent lately
    assert queue.likely_arrivals(clock.now) == 0  # its peak drops to its 3 in flight
    queue.answered(source, clock.now)
    assert queue.likely_arrivals(clock.now) == 1  # 3 at once lately, 2 in flight now


def test_a_closed_connection_is_not_expected_to_send(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = busy_source(queue, loop, peak=3, in_flight=0)
    source.is_closed = True
    assert queue.likely_arrivals(loop.time()) == 0
    source.is_closed = False  # forgotten, not merely skipped: its peak is gone
    assert queue.likely_arrivals(loop.time()) == 0


def test_put_refreshes_a_source_on_the_queue_clock(loop: VirtualLoop) -> None:
    clock = Clock()
    clock.now = 1e9  # far from any real clock
    queue = ModelQueue(10, clock=clock)
    source = Conn()
    for _ in range(3):
        queue.put(job(loop, source))
    for _ in range(3):
        queue.answered(source, clock.now)
    clock.now += 0.9
    queue.put(job(loop, source))  # active at 1e9 + 0.9: still within the window below
    assert queue.likely_arrivals(clock.now + 0.6) == 2


# --- sequences stick to a worker


def test_a_sequence_sticks_to_the_worker_that_took_it_first(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    s1, s2, plain, s3 = (
        job(loop, sequence="s"),
        job(loop, sequence="s"),
        job(loop),
        job(loop, sequence="s"),
    )
    for each in (s1, s2, plain, s3):
        queue.put(each)
    assert queue.take("a") is s1
    assert queue.take("b") is plain  # s2 belongs to a now: b skips it
    assert queue.take("b") is None
    assert run(loop, next_batch(queue, 8, 0, worker="a")) == [s2, s3]


def test_a_released_worker_hands_its_sequences_on(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    first, second = job(loop, sequence="s"), job(loop, sequence="s")
    queue.put(first)
    assert queue.take("a") is first
    queue.put(second)
    assert queue.take("b") is None

    async def b_waits_until_a_is_released() -> list[Job]:
        collector = asyncio.ensure_future(next_batch(queue, 1, 0, worker="b"))
        await asyncio.sleep(1)
        assert not collector.done()
        queue.release("a")  # a died: its sequences may move
        return await collector

    assert run(loop, b_waits_until_a_is_released()) == [second]


def test_a_collector_without_a_worker_takes_sequence_jobs_without_owning_them(
    loop: VirtualLoop,
) -> None:
    queue = queue_on(loop)
    first, second = job(loop, sequence="s"), job(loop, sequence="s")
    queue.put(first)
    queue.put(second)
    assert queue.take() is first
    assert queue.take("b") is second


def test_the_least_recently_used_sequence_is_forgotten_past_max_sequences(
    loop: VirtualLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "MAX_SEQUENCES", 2)
    queue = queue_on(loop)
    for sequence in ("old", "mid", "new"):
        queue.put(job(loop, sequence=sequence))
        assert queue.take("a") is not None
    queue.put(job(loop, sequence="old"))  # forgotten when "new" came: any worker may take it
    assert queue.take("b") is not None
    queue.put(job(loop, sequence="new"))  # the most recently used: still a's
    assert queue.take("b") is None and queue.take("a") is not None


def test_requeued_sequence_jobs_are_still_pinned(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    owned, pinned = job(loop, sequence="s"), job(loop, sequence="s")
    queue.put(owned)
    assert queue.take("a") is owned
    queue.put(pinned)
    assert queue.take("a") is pinned
    queue.requeue_front([pinned])
    assert queue.take("b") is None
    assert queue.take("a") is pinned


# --- sources are forgotten, whatever the batch size


class Closable(Conn):
    """A source that tells the queue when it closes, as an `http1.Connection` does."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: set[Any] = set()

    def when_closed(self, callback: Any) -> None:
        self.callbacks.add(callback)

    def close(self) -> None:
        self.is_closed = True
        for callback in self.callbacks:
            callback(self)


def serve_one_request_each(queue: ModelQueue, loop: VirtualLoop, sources: list[Any]) -> None:
    """Batch size 1: each source's request is taken and answered; `likely_arrivals` (which
    only a collector filling a bigger batch asks) is never called."""
    for source in sources:
        queue.put(job(loop, source))
        assert queue.take() is not None
        queue.answered(source, loop.time())


def test_closed_connections_are_forgotten_at_batch_size_1(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    sources = [Closable() for _ in range(200)]
    serve_one_request_each(queue, loop, sources)
    for source in sources:
        source.close()
    assert queue.tracked_sources() == 0


def test_a_connection_closed_with_a_request_in_flight_is_forgotten_at_its_answer(
    loop: VirtualLoop,
) -> None:
    queue = queue_on(loop)
    source = Closable()
    queue.put(job(loop, source))
    source.close()
    assert queue.tracked_sources() == 1  # still owed an answer
    queue.answered(source, loop.time())
    assert queue.tracked_sources() == 0


def test_a_source_registers_its_close_callback_once(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    source = Closable()
    serve_one_request_each(queue, loop, [source] * 5)
    assert len(source.callbacks) == 1


def test_idle_sources_that_cannot_tell_are_forgotten_after_the_window(loop: VirtualLoop) -> None:
    clock = Clock()
    queue = ModelQueue(1000, clock=clock)
    for n in range(300):  # gRPC peers, one connection each, never told closed
        queue.put(job(loop, f"ipv4:127.0.0.1:{n}"))
        assert queue.take() is not None
        queue.answered(f"ipv4:127.0.0.1:{n}", clock.now)
        clock.now += SOURCE_WINDOW / 10
    # only those of about the last window are left
    assert queue.tracked_sources() <= 21
    clock.now += SOURCE_WINDOW + 0.001
    queue.answered(None, clock.now)
    assert queue.tracked_sources() == 0


def test_ready_batch_takes_a_full_batch_or_nothing(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    jobs = [job(loop) for _ in range(3)]
    for queued in jobs:
        queue.put(queued)
    assert batching.ready_batch(queue, 4) == []  # 3 waiting: next_batch decides how long to wait
    assert len(queue) == 3
    jobs[0].answer(Response(504, "", b""))  # answered already: no longer counts toward a batch
    queue.put(extra := job(loop))
    assert batching.ready_batch(queue, 4) == []
    assert [queue.take(), queue.take(), queue.take()] == [jobs[1], jobs[2], extra]  # order kept
    for queued in jobs[1:]:
        queue.put(queued)
    assert batching.ready_batch(queue, 2) == jobs[1:]
    assert batching.ready_batch(queue, 1) == []  # empty


def test_ready_batch_leaves_another_workers_sequence(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    first = job(loop, sequence="s")
    queue.put(first)
    assert queue.take("worker-a") is first  # the sequence is now worker-a's
    queue.put(second := job(loop, sequence="s"))
    assert batching.ready_batch(queue, 1, "worker-b") == []
    assert batching.ready_batch(queue, 1, "worker-a") == [second]
