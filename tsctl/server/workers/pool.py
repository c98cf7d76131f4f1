"""The pool that keeps one model version's workers serving its queue. Event-loop only.

`WorkerPool` keeps `target` workers (`tsctl.server.workers.process`) alive: one serving loop
per worker takes batches from the model's queue (`tsctl.server.batching`) and sends them;
while the queue has a batch ready, each next batch goes out by callback in the loop turn the
previous one's result arrives (`_Chain`: no task switch per batch). A worker that dies, busy
or idle, fails only the requests it held and is replaced after a backoff that grows with
consecutive failures (`restart_delay`): an idle one is noticed when
its process exits, not when the next request fails on it. A serving loop that meets an
unexpected error fails its batch, kills its worker and has it replaced the same way. A batch
past its deadline gets its worker killed and replaced; workers are recycled gracefully after
N requests or past an RSS limit (the successor starts first). Workers start at most
`start_group` at a time. A response is never larger than `max_response_size`: the worker's
reader skips a longer body, and a streamed answer whose chunks add up to more ends with an
error. Worker failures arrive as data (`Failure`) and become the errors
clients see in `error_for`: the statuses are chosen here, on the frontend, never by workers.

A model with stateful sessions (`tsctl.server.sessions`) has its answers read by them first:
a continuous batch's intermediate answer leaves its request on the worker (`_carry`), sent
again with that worker's next batch (`sessions.continued`) before it waits for new jobs.

Batches are chosen by the model version's batching strategy (`tsctl.plugins.api`), the
built-in `DefaultBatching` unless its model-config.yaml names a plugin. A plugin strategy is
held to the interface's rules (`_plugin_batch`): a strategy that raises or breaks them fails
the jobs it took (500, logged with its traceback) and its worker's loop asks it again after
`STRATEGY_PAUSE`; the worker is not killed, for its process is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tsctl.errors import (
    PREDICTION_FAILED,
    BadRequest,
    OutOfResources,
    PredictionFailed,
    ServiceUnavailable,
    TsctlError,
    WorkerDied,
    WorkerStartFailed,
    prediction_failed,
)
from tsctl.ipc.messages import Batch, Chunk, Failure, FailureKind, Result, WorkerState
from tsctl.plugins.api import BatchingStrategy
from tsctl.server.batching import STRATEGY_PAUSE, DefaultBatching, ModelQueue, ready_batch
from tsctl.server.request import Job, Response
from tsctl.server.sessions import Sessions, continued
from tsctl.server.telemetry.prometheus import HOSTNAME, Metrics, ModelSeries, ts_micros
from tsctl.server.workers.inflight import AsyncWorkerProcess, serve_concurrently
from tsctl.server.workers.process import WorkerProcess

log = logging.getLogger("tsctl.server")

#: the longest wait before restarting a worker, however often it has failed (seconds)
MAX_BACKOFF = 30.0
#: requests are written behind the one a worker runs (`_Chain`) only while the work ahead of
#: the last of them, reckoned from the handler time of the worker's last request, is under
#: this (ms): the round trip each saves matters, and a wait behind is short
BEHIND_MS = 5.0
#: the most batches written behind the one a worker runs
BEHIND_MAX = 64
#: what a client whose job a failed batching strategy held is answered (500)
STRATEGY_FAILED = "the model's batching strategy failed on this request (see the server's log)"
_batch_ids = itertools.count(1)


def restart_delay(failures: int) -> float:
    """Seconds to wait before starting a replacement worker, given the `failures` in a row
    (deaths or failed starts) before the one at hand: at once the first time, then 1, 2, 4, ...
    seconds, at most `MAX_BACKOFF` however long a worker keeps failing. A batch answered
    resets the count."""
    if failures <= 0:
        return 0.0
    return min(MAX_BACKOFF, 2.0 ** min(failures - 1, 32))


def error_for(failure: Failure) -> TsctlError:
    """The error a worker's failure is answered with (and so its HTTP and gRPC status): a
    request its envelope could not read is the client's mistake (400); memory that ran out is
    507, as TorchServe answers it; a handler's `PredictionException` gets the status and the
    message the handler chose; an exception the handler did not mean for clients is
    TorchServe's bare "Prediction failed" (its text and traceback are in model_log.log, under
    the request ids, which each answer carries); anything else is a failed prediction (503)."""
    if failure.kind is FailureKind.INVALID_INPUT:
        return BadRequest(failure.message)
    if failure.kind is FailureKind.OUT_OF_MEMORY:
        return OutOfResources(failure.message)
    if failure.kind is FailureKind.HANDLER_ERROR:
        return PredictionFailed(PREDICTION_FAILED)
    if failure.kind is FailureKind.MISCONFIGURED:  # the operator's to fix: 500, named
        return TsctlError(failure.message)
    return prediction_failed(failure.message, failure.status)


@dataclass(frozen=True)
class PoolSettings:
    batch_size: int
    max_batch_delay: float  # ms
    startup_timeout: float  # s
    max_response_size: int
    recycle_after_requests: int = 0  # 0 = never
    recycle_above_rss_mb: int = 0  # 0 = never
    #: workers started at once when the pool grows (the registry passes the core count):
    #: starting one imports its handler's modules, which is CPU-bound
    start_group: int = 4


class WorkerPool:
    """Keeps `target` workers of one model version serving its queue."""

    def __init__(
        self,
        name: str,
        model: tuple[str, str],
        queue: ModelQueue,
        settings: PoolSettings,
        make_worker: Callable[[str], WorkerProcess],
        metrics: Metrics,
        strategy: BatchingStrategy | None = None,
    ) -> None:
        self.name = name
        self.model_name, self.version = model
        self.metrics = metrics
        self._series: ModelSeries | None = None  # `_bind_series`
        self.queue = queue
        self.settings = settings
        self.make_worker = make_worker
        self.target = 0
        self.workers: list[WorkerProcess] = []
        #: workers whose process is loading its handler (the describe API lists them too)
        self.starting: list[WorkerProcess] = []
        self._loops: dict[WorkerProcess, asyncio.Task[None]] = {}
        #: each busy worker's answer deadline (loop time; 0 when idle) and its one watchdog timer
        self._due: dict[WorkerProcess, float] = {}
        self._watchdogs: dict[WorkerProcess, asyncio.TimerHandle] = {}
        self._ids = itertools.count(9000)
        self._failures = 0
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()
        #: workers whose serving loop waits for a batch (cancelled at once if they die)
        self._idle: set[WorkerProcess] = set()
        #: each worker's requests a continuous batch streams: sent again with its next batch
        self._carry: dict[WorkerProcess, list[Job]] = {}
        #: the batches of results read together, recorded and not answered yet (`_grouped`)
        self._held: list[tuple[WorkerProcess, list[Job], Result]] | None = None
        #: the model version's batching strategy (`configure`d for it), and how it is called:
        #: the default one directly (its methods are `tsctl.server.batching`'s functions),
        #: a plugin through the checks of `_plugin_batch` and `_plugin_ready_batch`
        self.strategy = DefaultBatching() if strategy is None else strategy
        self._next_batch: Callable[[ModelQueue, int, float, WorkerProcess], Awaitable[list[Job]]]
        self._ready_batch: Callable[[ModelQueue, int, WorkerProcess], list[Job]]
        if type(self.strategy) is DefaultBatching:
            self._next_batch = self.strategy.next_batch
            self._ready_batch = self.strategy.ready_batch
        else:
            queue.record_takes()
            self._next_batch = self._plugin_batch
            self._ready_batch = self._plugin_ready_batch

    def busy(self) -> bool:
        return any(w.state == WorkerState.BUSY for w in self.workers)

    async def scale(self, target: int) -> None:
        """Start or stop workers until `target` are running; raises if a new one fails.
        New workers start `start_group` at a time, each group once the one before is up."""
        self.target = target
        while len(self.workers) > target:
            await self._retire(self.workers[-1])
        group = max(1, self.settings.start_group)
        while (missing := target - len(self.workers)) > 0 and self.target == target:
            starts = [self._start_one() for _ in range(min(group, missing))]
            results = await asyncio.gather(*starts, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

    async def _start_one(self) -> WorkerProcess:
        if self._closed:  # its model's files may be gone already
            raise ServiceUnavailable(f"model {self.name} is being unloaded")
        worker = self.make_worker(f"{next(self._ids)}-{self.name}")
        worker.max_body = self.settings.max_response_size
        started = time.perf_counter()
        self.starting.append(worker)
        try:
            await worker.start()
        except WorkerStartFailed as exc:
            _log_if_timed_out(worker, exc)
            raise
        finally:
            self.starting.remove(worker)
        self.metrics.worker_load_time.set(
            (f"W-{worker.worker_id}", "Host", HOSTNAME), (time.perf_counter() - started) * 1000
        )
        if self._closed:
            await worker.stop()
            raise ServiceUnavailable(f"model {self.name} is being unloaded")
        self.workers.append(worker)
        if isinstance(worker, AsyncWorkerProcess):  # asyncCommunication: many batches at once
            self._loops[worker] = asyncio.create_task(serve_concurrently(self, worker))
        else:
            worker.grouped = self._grouped
            self._loops[worker] = asyncio.create_task(self._serve(worker))
        worker.when_dead(lambda: self._died(worker))
        log.info("worker %s started (pid %s)", worker.worker_id, worker.pid)
        return worker

    def _died(self, worker: WorkerProcess) -> None:
        """`worker`'s process is gone: an idle serving loop stops waiting for a batch (a busy
        one learns it from its batch, which fails)."""
        loop_task = self._loops.get(worker)
        if loop_task is not None and worker in self._idle:
            loop_task.cancel()

    async def _serve(self, worker: WorkerProcess) -> None:
        """The worker's serving loop: collect a batch (the strategy's `next_batch`), send it,
        and wait while it and the batches sent after it are answered (`_Chain`). When a
        result arrives and the strategy has the next batch ready (its `ready_batch`; the
        default's: full, or a job waiting at batch size 1), that batch is sent, then this
        one's answers are written, in the loop turn the result arrived: the worker computes
        while the daemon answers (still one batch at a time in the worker), and no task
        switch separates them. The loop collects again once a result finds no batch ready."""
        settings = self.settings
        chain = _Chain(self, worker, asyncio.get_running_loop())
        jobs: list[Job] = []
        try:
            while worker.state == WorkerState.READY:
                if self._carry and (carried := self._carry.pop(worker, None)):
                    jobs = continued(self.queue, carried, settings.batch_size, worker)
                elif (collected := await self._collect(worker)) is not None:
                    jobs = collected
                else:
                    continue
                ended = chain.start(jobs)
                jobs = []
                if ended is None:
                    continue
                with contextlib.suppress(WorkerDied):  # its death answers the batch (`_Chain`)
                    await worker.drain()
                await ended
        except asyncio.CancelledError:
            if worker.state != WorkerState.DEAD:
                raise  # retired, or the pool is closing
            log.warning("worker %s (pid %s) died while idle", worker.worker_id, worker.pid)
        except Exception:
            log.exception("serving worker %s failed; replacing it", worker.worker_id)
            failed = PredictionFailed(f"worker {worker.worker_id} failed; it is replaced")
            _fail([*jobs, *chain.in_flight()], failed)
            worker.kill()
            await worker.dead.wait()
        finally:
            self._serving_ended(worker)
        await self._after_serving(worker)

    def _serving_ended(self, worker: WorkerProcess) -> None:
        """A serving loop's last bookkeeping (in its `finally`: it never awaits): the
        requests it streamed fail, its watchdog and sessions go, it leaves the workers."""
        self._loops.pop(worker, None)
        _fail(self._carry.pop(worker, []), PredictionFailed(f"worker {worker.worker_id} stopped"))
        self._unwatch(worker)
        self.queue.release(worker)
        if worker in self.workers:
            self.workers.remove(worker)

    async def _after_serving(self, worker: WorkerProcess) -> None:
        """After a serving loop that was not retired: a dead worker is replaced (after the
        backoff), a live one (it failed, or was recycled) stops."""
        if worker.state == WorkerState.DEAD and not self._closed:
            self.metrics.restarts.inc((self.model_name, self.version))
            self._schedule_restart()
        elif worker.state != WorkerState.DEAD:
            await worker.stop()

    async def _collect(self, worker: WorkerProcess) -> list[Job] | None:
        """`worker`'s next batch from the strategy's `next_batch`, the worker counted idle
        while it waits; None when a plugin strategy raised (its batch failed, not its worker;
        after a pause, idle still: a death cancels it). Both serving loops collect here."""
        settings = self.settings
        self._idle.add(worker)
        try:
            return await self._next_batch(
                self.queue, settings.batch_size, settings.max_batch_delay, worker
            )
        except Exception:
            self._strategy_failed(worker, "next_batch")
            await asyncio.sleep(STRATEGY_PAUSE)
            return None
        finally:
            self._idle.discard(worker)

    def _check_recycle(self, worker: WorkerProcess) -> None:
        """After a batch: start `worker`'s successor if it is due for recycling."""
        if not worker.recycling and self._should_recycle(worker):
            worker.recycling = True
            log.info("recycling worker %s after %d requests", worker.worker_id, worker.served)
            self._background(self._replace(worker))

    async def _replace(self, old: WorkerProcess) -> None:
        """Start a successor first, then retire `old`: capacity never drops, nothing is lost."""
        try:
            await self._start_one()
        except TsctlError as exc:
            log.error("could not start a successor for worker %s: %s", old.worker_id, exc)
            old.recycling = False
            return
        if old in self.workers:
            await self._retire(old)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _should_recycle(self, worker: WorkerProcess) -> bool:
        s = self.settings
        if self._carry and self._carry.get(worker):  # not while it streams (continuous)
            return False
        if s.recycle_after_requests and worker.served >= s.recycle_after_requests:
            return True
        return bool(s.recycle_above_rss_mb and worker.rss_mb() > s.recycle_above_rss_mb)

    def _send(self, worker: WorkerProcess, jobs: list[Job]) -> _Sent | None:
        """Send the batch of `jobs` still waiting, its result to a future (an async worker's
        batches; a sync worker's go through `_Chain`); None when there is nothing to wait for
        (none was live, or it could not be sent: those jobs are answered with the error)."""
        live = [job for job in jobs if not job.done]
        if not live:
            return None
        dispatched = self._dispatch(worker, live, asyncio.get_running_loop())
        if dispatched is None:
            return None
        batch_id, now, waiter = dispatched
        assert waiter is not None
        return _Sent(live, waiter, now, batch_id)

    def _dispatch(
        self,
        worker: WorkerProcess,
        live: list[Job],
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[Result | WorkerDied], None] | None = None,
        behind: bool = False,
    ) -> tuple[int, float, asyncio.Future[Result] | None] | None:
        """Write the batch of `live` jobs to `worker`, its result to `on_result` (`send_then`)
        or, without one, to the future returned with the batch's id and when it was sent;
        None when it could not be sent (the jobs are answered with the error). The batch's
        queue metrics are recorded once it is written: the worker starts on it meanwhile.
        `behind`: it waits behind the batch the worker runs (`_Chain`), which keeps the
        watchdog."""
        batch = Batch(next(_batch_ids), [job.request for job in live], [job.entry for job in live])
        now = loop.time()
        sessions = self.queue.sessions
        carried = sessions.carried if sessions is not None else ()
        if carried:  # a stream's step: the response timeout from now (per step)
            for job in live:
                if job in carried:
                    self.queue.deadlines.renew(job, loop)
        on_chunk = _fan_out(live, self.settings.max_response_size, sessions)
        waiter = None
        try:
            if on_result is None:
                waiter = worker.send(batch, on_chunk)
            else:
                worker.send_then(batch, on_result, on_chunk, behind)
        except TsctlError as exc:  # the worker died, or the batch could not be encoded
            self._record_dispatch(live, now, carried)
            _fail(live, exc)
            return None
        self._record_dispatch(live, now, carried)
        if not behind:
            self._watch(worker, _latest_deadline(live), loop)
        return batch.batch_id, now, waiter

    async def _plugin_batch(
        self, queue: ModelQueue, batch_size: int, max_delay: float, worker: WorkerProcess
    ) -> list[Job]:
        """A plugin strategy's `next_batch`, held to the interface's rules (`_checked`). When
        it is cancelled (its worker died or retires), the jobs it took go back to the front
        of the queue; when it raises, `_serve` fails them (`_strategy_failed`)."""
        try:
            jobs = await self.strategy.next_batch(queue, batch_size, max_delay, worker)
        except asyncio.CancelledError:
            queue.requeue_front(queue.taken_by(worker))
            raise
        return self._checked(jobs, batch_size, worker, at_least_one=True)

    def _plugin_ready_batch(
        self, queue: ModelQueue, batch_size: int, worker: WorkerProcess
    ) -> list[Job]:
        """A plugin strategy's `ready_batch`, checked as `_plugin_batch`; one that raises
        fails the jobs it took, and nothing is sent early."""
        try:
            return self._checked(
                self.strategy.ready_batch(queue, batch_size, worker), batch_size, worker
            )
        except Exception:
            self._strategy_failed(worker, "ready_batch")
            return []

    def _checked(
        self, jobs: list[Job], batch_size: int, worker: WorkerProcess, at_least_one: bool = False
    ) -> list[Job]:
        """`jobs`, if the strategy kept the rules: a list of at most `batch_size` jobs (at
        least one from `next_batch`), each taken from the queue. Jobs it took and did not
        return go back to the front of the queue. A broken rule fails the jobs it took and
        raises `StrategyBroke` (the caller logs it)."""
        taken = self.queue.taken_by(worker)
        problem = ""
        if not isinstance(jobs, list) or not all(isinstance(job, Job) for job in jobs):
            problem = f"it returned {type(jobs).__name__}, not a list of jobs"
        elif len(jobs) > batch_size:
            problem = f"it returned {len(jobs)} jobs, over the batch size {batch_size}"
        elif at_least_one and not jobs:
            problem = "next_batch returned no job (it must wait until it has one)"
        elif not set(jobs) <= set(taken):
            problem = "it returned a job it did not take from the queue (take, take_job)"
        if problem:
            _fail(taken, TsctlError(STRATEGY_FAILED))
            raise StrategyBroke(problem)
        if len(taken) > len(jobs):
            chosen = set(jobs)
            self.queue.requeue_front([job for job in taken if job not in chosen])
        return jobs

    def _strategy_failed(self, worker: WorkerProcess, method: str) -> None:
        """The strategy's `method` raised (called in its `except`): log it with its
        traceback and answer the jobs it had taken with 500."""
        log.exception(
            "batching strategy %s failed in %s for model %s version %s (worker %s); "
            "the jobs it had taken are answered 500",
            self.strategy.name, method, self.model_name, self.version, worker.worker_id,
        )  # fmt: skip
        _fail(self.queue.taken_by(worker), TsctlError(STRATEGY_FAILED))

    def _answer(self, worker: WorkerProcess, live: list[Job], at: float, result: Result) -> None:
        """Answer the jobs of the batch sent at `at` (loop time) with its `result`."""
        sessions = self.queue.sessions
        if sessions is not None and sessions.carried:  # a stream's step is no new request
            worker.served += sum(job not in sessions.carried for job in live)
        else:
            worker.served += len(live)
        self._failures = 0
        batch_ms = (time.monotonic() - at) * 1000  # the loop's clock, without looking it up
        self._record_result(result, live, batch_ms)
        if self._held is not None:  # results read together: answered after all are recorded
            self._held.append((worker, live, result))
            return
        self.metrics.settle_logs()  # the batch's metric lines, before its answers go out
        self._deliver(worker, live, result)

    def _grouped(self, handle: Callable[[], None]) -> None:
        """Handle the results a worker's socket gave at once (`WorkerProcess.grouped`): their
        batches' metric lines are all recorded first and written in one go, then each batch
        is answered, in order (one write per log for them all, not per batch)."""
        if self.queue.sessions is not None:  # a stream's answers go as they come
            handle()
            return
        held: list[tuple[WorkerProcess, list[Job], Result]] = []
        self._held = held
        try:
            handle()
        finally:
            self._held = None
            if held:
                self.metrics.settle_logs()
            for worker, live, result in held:
                self._deliver(worker, live, result)

    def _deliver(self, worker: WorkerProcess, live: list[Job], result: Result) -> None:
        """Answer the jobs of a batch with its `result` (its metrics are recorded). The
        batches written to `worker` while its read is handled go first (`flush_writes`)."""
        worker.flush_writes()
        sessions = self.queue.sessions
        if result.failure is not None:
            _fail(live, error_for(result.failure))
            return
        # bodies over max_response_size were skipped as they were read (RESPONSE_TOO_LARGE)
        for job, answer in zip(live, result.responses, strict=True):
            if answer.failure is not None:
                job.answer(error_for(answer.failure))
                continue
            response = Response(
                answer.status,
                answer.content_type,
                answer.body,
                tuple(answer.headers),
                answer.reason,
            )
            if sessions is not None and job.sequence is not None:
                kept = sessions.answered(job, response, self.settings.max_response_size)
                if kept is None:  # streamed on: sent again with the worker's next batch
                    if not job.done:
                        self._carry.setdefault(worker, []).append(job)
                    continue
                response = kept
            job.answer(response)

    def _bind_series(self) -> ModelSeries:
        """The model version's series (`Metrics.for_model`), bound at its first batch."""
        self._series = self.metrics.for_model(self.model_name, self.version)
        return self._series

    def _record_dispatch(
        self, jobs: list[Job], now: float, carried: set[Job] | tuple[()] = ()
    ) -> None:
        """The batch's queue metrics; the steps of streams (`carried`) waited in no queue.
        Values at TorchServe's resolution (`ts_micros`; QueueTime in whole ms)."""
        series = self._series or self._bind_series()
        waited = [now - job.request.arrival for job in jobs if not carried or job not in carried]
        if waited:
            series.queue_latency.inc(ts_micros(sum(waited)))
            series.queue_time.set(float(int(waited[-1] * 1000)))
        series.batch_size.observe(len(jobs))

    def _record_result(self, result: Result, jobs: list[Job], batch_ms: float) -> None:
        """The batch's metrics: the frontend's, the handler time it measured and the
        handler's own (`Metrics` routes each by `metrics_mode` and the metrics config).
        TorchServe's resolution: WorkerThreadTime in whole ms, the handler time in 0.01 ms."""
        stats = self.metrics
        series = self._series or self._bind_series()
        series.worker_thread_time.set(float(int(max(0.0, batch_ms - result.handler_ms))))
        request_id = jobs[0].request.request_id
        handler_ms = round(result.handler_ms, 2)
        for handler_time in series.handler_time():
            handler_time.record(handler_ms, request_id)
        for metric in result.metrics:
            stats.model_metric(
                metric.name, metric.unit, metric.kind, metric.value, metric.dimensions, request_id
            )

    def _watch(self, worker: WorkerProcess, due: float, loop: asyncio.AbstractEventLoop) -> None:
        """`worker` must answer its batch by `due` (loop time) or be killed. One timer per
        worker, moved only to an earlier time: batch after batch reuses it (deadlines only
        grow), and when it fires early for the batch in progress it is set again."""
        self._due[worker] = due
        timer = self._watchdogs.get(worker)
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._watchdogs[worker] = loop.call_at(due, self._check_due, worker, loop)

    def _check_due(self, worker: WorkerProcess, loop: asyncio.AbstractEventLoop) -> None:
        del self._watchdogs[worker]
        due = self._due.get(worker, 0.0)
        if not due:  # idle: nothing to watch until its next batch
            return
        if loop.time() < due:
            self._watchdogs[worker] = loop.call_at(due, self._check_due, worker, loop)
            return
        log.error("worker %s overran the response timeout; replacing it", worker.worker_id)
        worker.kill()

    def _unwatch(self, worker: WorkerProcess) -> None:
        self._due.pop(worker, None)
        timer = self._watchdogs.pop(worker, None)
        if timer is not None:
            timer.cancel()

    def _schedule_restart(self, retrying: bool = False) -> None:
        """Start a replacement worker after `restart_delay`. `retrying`: a restart that failed
        asks again (it is itself one of the pool's tasks, so it does not count as pending)."""
        if not retrying and len(self.workers) + len(self._tasks) >= self.target:
            return
        delay = restart_delay(self._failures)
        self._failures += 1
        self._background(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        if delay:
            log.info("restarting a %s worker in %.0f s", self.name, delay)
            await asyncio.sleep(delay)
        if self._closed or len(self.workers) >= self.target:
            return
        try:
            await self._start_one()
        except TsctlError as exc:
            log.error("restarting a %s worker failed: %s", self.name, exc)
            self._schedule_restart(retrying=True)

    async def _retire(self, worker: WorkerProcess) -> None:
        """Stop one worker after its current batch; an idle (or dead) one stops at once."""
        if worker in self.workers:
            self.workers.remove(worker)
        loop_task = self._loops.get(worker)
        if loop_task is not None and worker.state == WorkerState.READY:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        elif loop_task is not None:
            if worker.state == WorkerState.BUSY:
                worker.state = WorkerState.RETIRING
            await asyncio.gather(loop_task, return_exceptions=True)
        await worker.stop()

    async def close(self, error: TsctlError) -> None:
        """Stop every worker (after in-flight batches) and fail what is still queued."""
        self._closed = True
        if self.queue.sessions is not None:
            self.queue.sessions.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._retire(w) for w in list(self.workers)))
        self.queue.drop_all(error)


def _fan_out(
    jobs: list[Job], limit: int, sessions: Sessions | None = None
) -> Callable[[Chunk], None] | None:
    """Deliver each intermediate answer of a chunk to its request, if it asked for chunks. A
    failed answer ends its request with the error, and so does a stream whose chunks add up
    to more than `limit` bytes (the final answer is not counted: it is bounded by itself); a
    stateful model's `sessions` count them over all the steps of a continuous stream."""
    for job in jobs:  # a loop, not `any` over a generator: this runs for every batch
        if job.on_chunk is not None:
            break
    else:
        return None
    sent = [0] * len(jobs)

    def deliver(chunk: Chunk) -> None:
        for i, (job, answer) in enumerate(zip(jobs, chunk.responses, strict=False)):
            if job.on_chunk is None or job.done:
                continue
            if answer.failure is not None:
                job.answer(error_for(answer.failure))
                continue
            if sessions is not None:  # counted over all the steps of a continuous stream
                if not sessions.stream(job, len(answer.body), limit):
                    continue  # answered with the error
            else:
                sent[i] += len(answer.body)
                if sent[i] > limit:
                    job.answer(
                        PredictionFailed(
                            f"the streamed response of over {sent[i]} bytes exceeds "
                            f"max_response_size ({limit})"
                        )
                    )
                    continue
            job.on_chunk(
                Response(answer.status, answer.content_type, answer.body, tuple(answer.headers))
            )

    return deliver


def _log_if_timed_out(worker: WorkerProcess, exc: WorkerStartFailed) -> None:
    """A worker that did not load its handler within its `startup_timeout` leaves no traceback
    in model_log.log: say so as TorchServe does, in the two lines that log-based alerts (and
    TorchServe's tests) written for it match. Other failed starts have their handler's error
    and traceback in model_log.log already. (`WorkerProcess.start` raises the error while
    handling the `TimeoutError`, so it is the error's context.)"""
    if isinstance(exc.__context__, TimeoutError):
        log.error(
            "W-%s Backend worker error\norg.pytorch.serve.wlm.WorkerInitializationException: "
            "Backend worker did not respond in given time (%s)",
            worker.worker_id, exc.message,
        )  # fmt: skip


class StrategyBroke(Exception):
    """A plugin strategy broke the interface's rules (the message says which)."""


class _Chain:
    """A sync worker's batches as its serving loop (`WorkerPool._serve`) sends them: the
    first by the loop, each next one from the turn a result arrives, when the strategy has
    one ready. Results come to `_on_result` as callbacks (`send_then`); the loop waits on
    one future per chain, resolved when a result leaves nothing in flight (or with the
    error that stops the worker's loop).

    At batch size 1, while the worker runs a request and the strategy has more ready with no
    other worker of the pool idle, they are written too and wait in the worker's socket
    (`behind`): the worker starts each the moment it has written the result before it,
    instead of after a round trip through the daemon (which, at batch size 1, each request
    pays whole), and a busy daemon reads several results, and writes several requests, per
    turn of its loop. Still one batch at a time in the worker, in order: batching and
    ordering are as before. Only while the work ahead of a request behind is short (under
    `BEHIND_MS`, reckoned from the handler time of the worker's last request), so that it
    cannot wait long for a worker while another falls idle (one that suddenly runs long
    still holds those behind it until it ends, at most `BEHIND_MAX`); the only worker of a
    pool always takes one behind (no other could run it sooner). Never more than the
    worker's socket takes: the daemon holds no frame bytes for it. Only with the built-in
    strategy (a plugin's `ready_batch` is called as a result arrives, as documented). A
    batch waiting behind is timed by the watchdog from when it starts, its batch time
    (`WorkerThreadTime`) counts from when it was written, and if the worker dies before
    starting it its jobs go back to the front of the queue (nothing is lost to another
    batch's crash). Larger batches are not sent behind: measured, it gained nothing with one
    torch thread per worker and cost a tenth with two, whose threads lose the gaps between
    batches they shared the cores with the daemon in (docs/benchmarks.md)."""

    def __init__(
        self, pool: WorkerPool, worker: WorkerProcess, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pool = pool
        self.worker = worker
        self.loop = loop
        #: the batch the worker runs (or whose answers are being written); empty between chains
        self.jobs: list[Job] = []
        self.at = 0.0  # when it was sent (loop time)
        #: the batches waiting behind it in the worker's socket, in order, each with when
        #: it was sent
        self.behind: deque[tuple[list[Job], float]] = deque()
        #: the handler time of the worker's last batch (ms): how long a wait behind may be;
        #: unknown (as if long) before its first answer and after a failed batch
        self._last_ms = math.inf
        self._ended: asyncio.Future[None] | None = None

    def start(self, jobs: list[Job]) -> asyncio.Future[None] | None:
        """Send the batch of `jobs` still waiting (and those ready behind it, `_send_behind`):
        the future of the chain's end, or None when nothing was sent (none was live, or it could
        not be: answered with the error)."""
        if not self._send(jobs):
            return None
        self._send_behind()
        self._ended = self.loop.create_future()
        return self._ended

    def in_flight(self) -> list[Job]:
        return [*self.jobs, *self._behind_jobs()]

    def _behind_jobs(self) -> list[Job]:
        """The jobs of the batches waiting behind, in the order they were sent."""
        return [job for jobs, _ in self.behind for job in jobs]

    def _send(self, jobs: list[Job], behind: bool = False) -> bool:
        """Send the batch of `jobs` still waiting, to run now or (`behind`) after the one the
        worker runs; whether it was sent."""
        live = [job for job in jobs if not job.done]
        if not live:
            return False
        dispatched = self.pool._dispatch(self.worker, live, self.loop, self._on_result, behind)
        if dispatched is None:
            return False
        if behind:
            self.behind.append((live, dispatched[1]))
        else:
            self.jobs, self.at = live, dispatched[1]
        return True

    def _send_behind(self) -> None:
        """At batch size 1, write the strategy's ready batches behind the one running, while
        the work ahead of the next is short (`_room_behind`) and the worker's socket takes
        them (nothing is held in the daemon's buffer for it); none when another worker of the
        pool waits for a batch (it should have it), the model keeps sessions or its strategy
        is a plugin's."""
        pool = self.pool
        if (
            pool.settings.batch_size != 1
            or pool._idle
            or pool.queue.sessions is not None
            or pool._ready_batch is not ready_batch
        ):
            return
        alone = len(pool.workers) == 1
        while self.worker.state == WorkerState.BUSY and self._room_behind(alone):
            ready = pool._ready_batch(pool.queue, 1, self.worker)
            if not ready or not self._send(ready, True):
                return

    def _room_behind(self, alone: bool) -> bool:
        """Whether one more batch may wait behind: the work ahead of it (the batch running
        and those behind already, each reckoned at the last one's handler time) is under
        `BEHIND_MS`, or it would be the first behind the only worker (no other could run it
        sooner); at most `BEHIND_MAX`, and not while the daemon holds bytes the worker's
        socket did not take."""
        waiting = len(self.behind)
        if waiting >= BEHIND_MAX or self.worker.write_backlog():
            return False
        return (alone and not waiting) or (waiting + 1) * self._last_ms < BEHIND_MS

    def _on_result(self, outcome: Result | WorkerDied) -> None:
        """The worker answered the batch it ran (or died): in the turn that said so."""
        try:
            busy = self._land(outcome)
        except Exception as exc:  # the serving loop fails the batch and replaces the worker
            self._end(exc)
            return
        if not busy:
            self._end(None)

    def _land(self, outcome: Result | WorkerDied) -> bool:
        """Start the first batch behind (or send the next one if ready), send those ready
        behind it, then answer the batch `outcome` is for; whether a batch is still in
        flight."""
        pool, worker = self.pool, self.worker
        pool._due[worker] = 0.0
        if isinstance(outcome, WorkerDied):
            _fail(self.jobs, outcome)
            if self.behind:  # they never started: another worker (or the successor) runs them
                unrun = self._behind_jobs()
                log.warning(
                    "worker %s died before the batch(es) behind its own; their %d request(s) "
                    "go back to the front of the queue",
                    worker.worker_id, len(unrun),
                )  # fmt: skip
                pool.queue.requeue_front(unrun)
                self.behind.clear()
            self.jobs = []
            return False
        jobs, at = self.jobs, self.at
        try:
            self._last_ms = outcome.handler_ms if outcome.failure is None else math.inf
            self.jobs = []
            if self.behind:  # the worker started it as it wrote the result: timed from now
                self.jobs, self.at = self.behind.popleft()
                due = _latest_deadline(self.jobs) + (self.loop.time() - self.at)
                pool._watch(worker, due, self.loop)
            if worker.state.serving and pool.queue.sessions is None:
                if not self.jobs:
                    ready = pool._ready_batch(pool.queue, pool.settings.batch_size, worker)
                    if ready:
                        self._send(ready)
                if self.jobs:
                    self._send_behind()
            pool._answer(worker, jobs, at, outcome)
        except Exception:
            # the serving loop fails the landed batch (and the ones sent) and stops
            _fail(self.in_flight(), PredictionFailed(f"worker {worker.worker_id} failed"))
            self.jobs = jobs
            self.behind.clear()
            raise
        pool._check_recycle(worker)
        return bool(self.jobs)

    def _end(self, error: Exception | None) -> None:
        if error is None:
            self.jobs = []
        ended = self._ended
        if ended is None or ended.done():  # its serving loop was cancelled
            return
        if error is None:
            ended.set_result(None)
        else:
            ended.set_exception(error)


@dataclass
class _Sent:
    """A batch written to a worker: its live jobs, its result's future, when it was sent."""

    jobs: list[Job]
    result: asyncio.Future[Result]
    at: float
    batch_id: int = 0


def _latest_deadline(jobs: list[Job]) -> float:
    """The latest deadline of a batch's jobs (no generator for a batch of one)."""
    return jobs[0].deadline if len(jobs) == 1 else max(job.deadline for job in jobs)


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        job.answer(error)
