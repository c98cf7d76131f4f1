"""Batching strategies on a real `ModelQueue` and virtual time (tests/unit/test_batching.py's
loop): the built-in default, the queue methods a plugin strategy chooses jobs with, the
pool's checks on what a plugin strategy returns, and the priority example
(examples/plugins/priority_batching)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Hashable, Iterator, Mapping
from types import ModuleType
from typing import Any

import pytest

from tests.support.paths import ROOT
from tests.unit.test_batching import VirtualLoop, busy_source, job, queue_on, run
from tsctl.errors import TsctlError
from tsctl.plugins import BatchingStrategy
from tsctl.server import batching
from tsctl.server.batching import DefaultBatching, ModelQueue
from tsctl.server.request import InferenceRequest, Job, Response
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.pool import PoolSettings, StrategyBroke, WorkerPool

EXAMPLE = ROOT / "examples" / "plugins" / "priority_batching" / "tsctl_priority" / "__init__.py"


@pytest.fixture(scope="module")
def priority() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("tsctl_priority_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    yield virtual
    virtual.close()


_ids = iter(range(1, 1 << 30))


def tagged(loop: VirtualLoop, priority: str | None = None, name: str = "X-Priority") -> Job:
    """A job whose request carries `name: priority` (none when `priority` is None)."""
    headers = [] if priority is None else [(name, priority)]
    request = InferenceRequest(f"p{next(_ids)}", [], headers, loop.time())
    return Job(request, loop.create_future(), loop.time() + 60)


def put(queue: ModelQueue, *jobs: Job) -> None:
    for each in jobs:
        queue.put(each)


# --- the default strategy


def test_the_default_strategy_is_the_batching_functions_themselves() -> None:
    default = DefaultBatching()
    assert default.name == "default" and default.kind == "batching"
    # no wrapper: the pool's call per batch costs what it did before strategies
    assert default.next_batch is batching.next_batch
    assert default.ready_batch is batching.ready_batch
    assert default.configure({}) is default


def test_the_default_strategy_refuses_options() -> None:
    with pytest.raises(ValueError, match=r"takes no options.*max_low_per_batch"):
        DefaultBatching().configure({"max_low_per_batch": 2})


def test_the_base_ready_batch_sends_nothing_early(loop: VirtualLoop) -> None:
    class Fifo(BatchingStrategy):
        name = "fifo"

        async def next_batch(
            self, queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable
        ) -> list[Job]:
            return await batching.next_batch(queue, batch_size, max_delay_ms, worker)

    queue = queue_on(loop)
    put(queue, *(jobs := [job(loop) for _ in range(3)]))
    assert Fifo().ready_batch(queue, 1, "w") == []
    assert len(queue) == 3
    assert run(loop, Fifo().next_batch(queue, 2, 0, "w")) == jobs[:2]


class Newest(BatchingStrategy):
    """The 20-line strategy of the documentation (/work/notes/plugins-batching.md)."""

    name = "newest"

    async def next_batch(
        self, queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable
    ) -> list[Job]:
        batch: list[Job] = []
        while not batch:
            for newest in reversed(queue.waiting(worker)[-batch_size:]):
                if queue.take_job(newest, worker):
                    batch.append(newest)
            if not batch:
                await queue.wait_for_job()
        return batch


def test_the_documented_strategy_takes_the_newest_first(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, *(jobs := [job(loop) for _ in range(5)]))
    assert run(loop, Newest().next_batch(queue, 2, 0, "w")) == [jobs[4], jobs[3]]
    assert run(loop, Newest().next_batch(queue, 4, 0, "w")) == [jobs[2], jobs[1], jobs[0]]
    loop.call_later(1.0, queue.put, later := job(loop))
    assert run(loop, Newest().next_batch(queue, 4, 0, "w")) == [later]


# --- the queue methods a strategy chooses with


def test_waiting_is_a_snapshot_of_the_live_jobs_in_order(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, *(jobs := [job(loop) for _ in range(4)]))
    jobs[1].answer(Response(504, "", b""))  # timed out while waiting
    snapshot = queue.waiting()
    assert snapshot == [jobs[0], jobs[2], jobs[3]]
    snapshot.clear()  # a copy: the queue keeps its jobs
    assert len(queue) == 4
    assert queue.take() is jobs[0]


def test_waiting_leaves_out_another_workers_sequence(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, first := job(loop, sequence="s"))
    assert queue.take("a") is first  # the sequence is a's now
    put(queue, mine := job(loop, sequence="s"), free := job(loop))
    assert queue.waiting("b") == [free]
    assert queue.waiting("a") == [mine, free]


def test_take_job_takes_one_waiting_job_out_of_order(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, *(jobs := [job(loop) for _ in range(3)]))
    assert queue.take_job(jobs[2], "w")
    assert not queue.take_job(jobs[2], "w")  # taken already
    assert not queue.take_job(job(loop), "w")  # never queued here
    jobs[1].answer(Response(504, "", b""))
    assert not queue.take_job(jobs[1], "w")  # answered: nobody runs it
    assert queue.waiting() == [jobs[0]]
    assert queue.take() is jobs[0] and queue.take() is None


def test_take_job_keeps_a_sequence_on_one_worker(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, first := job(loop, sequence="s"), second := job(loop, sequence="s"))
    assert queue.take_job(first, "a")  # a owns the sequence now
    assert not queue.take_job(second, "b")
    assert queue.take("b") is None  # nor can b take it in order
    assert queue.take_job(second, "a")
    put(queue, plain := job(loop))
    assert queue.take() is plain  # no sequence job left waiting: plain FIFO again


def test_takes_are_recorded_per_worker_only_when_asked(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    put(queue, *(jobs := [job(loop) for _ in range(5)]))
    assert queue.take("a") is jobs[0]
    assert queue.taken_by("a") == []  # off: the default strategy's queue records nothing
    queue.record_takes()
    assert queue.take("a") is jobs[1]
    assert queue.take_job(jobs[3], "b")
    assert queue.take_job(jobs[4], "a")
    queue.requeue_front([jobs[4]])  # given back: no longer a's
    assert queue.taken_by("a") == [jobs[1]]
    assert queue.taken_by("a") == []  # handed over: forgotten
    assert queue.taken_by("b") == [jobs[3]]
    assert queue.waiting() == [jobs[4], jobs[2]]


# --- the pool's checks of a plugin strategy's batch


class Takes(BatchingStrategy):
    name = "takes"

    async def next_batch(
        self, queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable
    ) -> list[Job]:
        raise AssertionError("not called here")


def pool_for(queue: ModelQueue, strategy: BatchingStrategy) -> WorkerPool:
    settings = PoolSettings(batch_size=2, max_batch_delay=0, startup_timeout=1, max_response_size=1)
    return WorkerPool("m_1", ("m", "1"), queue, settings, None, Metrics(), strategy)  # type: ignore[arg-type]


def test_a_plugin_strategys_queue_records_takes_and_the_defaults_does_not(
    loop: VirtualLoop,
) -> None:
    default_queue, plugin_queue = queue_on(loop), queue_on(loop)
    pool_for(default_queue, DefaultBatching())
    pool_for(plugin_queue, Takes())
    for queue in (default_queue, plugin_queue):
        put(queue, job(loop))
        queue.take("w")
    assert default_queue.taken_by("w") == []
    assert len(plugin_queue.taken_by("w")) == 1


def test_jobs_taken_and_not_returned_go_back_to_the_front(loop: VirtualLoop) -> None:
    queue = queue_on(loop)
    pool = pool_for(queue, Takes())
    put(queue, *(jobs := [job(loop) for _ in range(4)]))
    assert [queue.take("w"), queue.take("w"), queue.take("w")] == jobs[:3]
    assert pool._checked([jobs[1]], 2, "w") == [jobs[1]]  # type: ignore[arg-type]
    assert queue.waiting() == [jobs[0], jobs[2], jobs[3]]  # in their order, at the front
    assert not any(each.done for each in jobs)


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        (lambda jobs: jobs[:3], "over the batch size 2"),
        (lambda jobs: [], "returned no job"),
        (lambda jobs: [jobs[3]], "did not take"),
        (lambda jobs: (jobs[0],), "not a list of jobs"),
    ],
)
def test_a_batch_that_breaks_the_rules_fails_the_jobs_taken(
    loop: VirtualLoop, returned: Any, problem: str
) -> None:
    queue = queue_on(loop)
    pool = pool_for(queue, Takes())
    put(queue, *(jobs := [job(loop) for _ in range(4)]))
    for _ in range(3):
        queue.take("w")
    with pytest.raises(StrategyBroke, match=problem):
        pool._checked(returned(jobs), 2, "w", at_least_one=True)  # type: ignore[arg-type]
    for each in jobs[:3]:
        assert each.done
        assert each.future is not None
        error = each.future.exception()
        assert isinstance(error, TsctlError) and error.http_status == 500
        assert "batching strategy failed" in error.message
    assert queue.waiting() == [jobs[3]]  # not taken: not failed


# --- the priority example


def make(priority: ModuleType, options: Mapping[str, Any]) -> Any:
    return priority.PriorityBatching().configure(options)


def test_high_jobs_come_first_in_arrival_order(loop: VirtualLoop, priority: ModuleType) -> None:
    strategy = make(priority, {})
    queue = queue_on(loop)
    low1, high1, low2 = tagged(loop, "low"), tagged(loop, "high"), tagged(loop)
    high2 = tagged(loop, "high")
    put(queue, low1, high1, low2, high2)
    assert run(loop, strategy.next_batch(queue, 3, 100, "w")) == [high1, high2, low1]
    assert queue.waiting() == [low2]


def test_low_jobs_are_capped_per_batch(loop: VirtualLoop, priority: ModuleType) -> None:
    strategy = make(priority, {"max_low_per_batch": 2})
    queue = queue_on(loop)
    lows = [tagged(loop, "low") for _ in range(5)]
    put(queue, *lows)
    assert run(loop, strategy.next_batch(queue, 4, 0, "w")) == lows[:2]
    put(queue, high := tagged(loop, "high"))
    assert run(loop, strategy.next_batch(queue, 4, 0, "w")) == [high, *lows[2:4]]


def test_the_header_is_read_in_any_case_and_the_default_class_applies(
    loop: VirtualLoop, priority: ModuleType
) -> None:
    strategy = make(priority, {"default_class": "high", "max_low_per_batch": 1})
    queue = queue_on(loop)
    grpc_low = tagged(loop, "low", name="x-priority")  # gRPC metadata is lower-case
    rest_low = tagged(loop, "LOW", name="X-PRIORITY")
    unnamed = tagged(loop)  # no header: default_class, high here
    odd = tagged(loop, "urgent")  # not a class: default_class
    put(queue, grpc_low, rest_low, unnamed, odd)
    assert run(loop, strategy.next_batch(queue, 4, 0, "w")) == [unnamed, odd, grpc_low]


def test_it_waits_up_to_the_delay_and_takes_a_high_job_arriving_meanwhile(
    loop: VirtualLoop, priority: ModuleType
) -> None:
    strategy = make(priority, {"max_low_per_batch": 1})
    queue = queue_on(loop)
    busy_source(queue, loop, peak=4, in_flight=0)  # a client likely to send again
    put(queue, low := tagged(loop, "low"), tagged(loop, "low"))
    high = tagged(loop, "high")
    loop.call_later(0.03, queue.put, high)
    assert run(loop, strategy.next_batch(queue, 4, 100, "w")) == [low, high]
    assert loop.time() == pytest.approx(0.1)  # then max_batch_delay ran out, as the default's


def test_it_sends_at_once_when_no_client_is_likely_to_send(
    loop: VirtualLoop, priority: ModuleType
) -> None:
    strategy = make(priority, {})
    queue = queue_on(loop)
    put(queue, lone := tagged(loop, "low"))
    assert run(loop, strategy.next_batch(queue, 4, 100, "w")) == [lone]
    assert loop.time() == 0.0


def test_an_idle_collector_takes_the_first_job_when_it_arrives(
    loop: VirtualLoop, priority: ModuleType
) -> None:
    strategy = make(priority, {})
    queue = queue_on(loop)
    arriving = tagged(loop, "high")
    loop.call_later(5.0, queue.put, arriving)
    assert run(loop, strategy.next_batch(queue, 4, 100, "w")) == [arriving]


def test_cancelling_gives_the_jobs_back(loop: VirtualLoop, priority: ModuleType) -> None:
    strategy = make(priority, {})
    queue = queue_on(loop)
    busy_source(queue, loop, peak=4, in_flight=0)
    put(queue, *(jobs := [tagged(loop, "low"), tagged(loop, "high")]))

    async def cancel_while_filling() -> None:
        task = asyncio.ensure_future(strategy.next_batch(queue, 8, 100, "w"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop, cancel_while_filling())
    assert sorted(map(id, queue.waiting())) == sorted(map(id, jobs))


def test_ready_batch_takes_a_full_batch_by_the_rules_or_nothing(
    loop: VirtualLoop, priority: ModuleType
) -> None:
    strategy = make(priority, {"max_low_per_batch": 2})
    queue = queue_on(loop)
    lows = [tagged(loop, "low") for _ in range(4)]
    put(queue, *lows)
    assert strategy.ready_batch(queue, 3, "w") == []  # only 2 lows may go: not full
    assert len(queue) == 4
    put(queue, high := tagged(loop, "high"))
    assert strategy.ready_batch(queue, 3, "w") == [high, *lows[:2]]
    assert queue.waiting() == lows[2:]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_low_per_batch": 0}, "max_low_per_batch"),
        ({"max_low_per_batch": "2"}, "max_low_per_batch"),
        ({"max_low_per_batch": True}, "max_low_per_batch"),
        ({"default_class": "medium"}, "default_class"),
        ({"colour": "red"}, "'colour'"),
    ],
)
def test_bad_options_are_refused_by_name(
    priority: ModuleType, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make(priority, options)


def test_configure_makes_an_instance_per_model(priority: ModuleType) -> None:
    plugin = priority.PriorityBatching()
    a, b = plugin.configure({"max_low_per_batch": 1}), plugin.configure({})
    assert a is not b and a is not plugin
    assert (a.max_low, b.max_low, b.default_class) == (1, None, "low")
