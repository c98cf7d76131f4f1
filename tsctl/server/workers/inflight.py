"""Workers of `asyncCommunication: true` models: several batches in flight at once. Event-loop
only; nothing here blocks.

TorchServe's `AsyncWorkerThread` sends a worker every batch its queue forms without waiting for
the answers, which come back in whatever order the handler's coroutines end. tsctl does the
same with a bound: at most `max_in_flight` batches per worker (`maxBatchesInFlight` in
model-config.yaml, by default the server's `job_queue_size`); a worker at the bound takes the
next batch when one of its batches is answered.

`AsyncWorkerProcess` is the worker as the daemon sees it: results and a streaming handler's
chunks are matched to their batch by id (a `describe` call is still answered in order, by
`WorkerProcess`), and its death fails every batch it held with `WorkerDied`. Its state is BUSY
only at the bound. `serve_concurrently` is its serving loop, `WorkerPool._serve`'s twin (same
batching strategy, answers, recycling, restarts and deaths): it collects batches and sends
them while earlier ones run, and each sent batch is answered by a task of its own. The
response timeout holds per batch: the worker's watchdog is due at the earliest deadline among
its batches, and a batch past its deadline gets the worker killed and replaced, as a sync
worker's (TorchServe answers that "Worker died"); its other batches then fail with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tsctl.errors import PredictionFailed, TsctlError, WorkerDied
from tsctl.ipc.messages import Batch, Chunk, Message, Result, WorkerSpec, WorkerState
from tsctl.server.workers.process import WorkerProcess
from tsctl.server.workers.spares import Spare

if TYPE_CHECKING:
    from tsctl.server.request import Job
    from tsctl.server.workers.pool import WorkerPool, _Sent

log = logging.getLogger("tsctl.server")


class AsyncWorkerProcess(WorkerProcess):
    """A worker that holds up to `max_in_flight` batches at once (see the module)."""

    def __init__(
        self,
        spec: WorkerSpec,
        spare: Spare | None = None,
        max_body: int | None = None,
        max_in_flight: int = 1,
    ) -> None:
        super().__init__(spec, spare, max_body)
        self.max_in_flight = max(1, max_in_flight)
        #: batches sent and not answered, by id: their result's future and chunk receiver
        self.flights: dict[int, tuple[asyncio.Future[Result], Callable[[Chunk], None] | None]]
        self.flights = {}
        self.when_dead(self._fail_flights)  # before the pool's callback: answers first

    def send(
        self, batch: Batch, on_chunk: Callable[[Chunk], None] | None = None
    ) -> asyncio.Future[Result]:
        """Write one batch now and return the future of its result (`WorkerDied` if the
        process goes away); BUSY once `max_in_flight` batches are out."""
        if not self.state.serving or len(self.flights) >= self.max_in_flight:
            raise WorkerDied(f"worker {self.worker_id} cannot take a batch now")
        waiter: asyncio.Future[Result] = self._write(batch, on_chunk)
        # `_write` queued it for an answer in order; a batch's answer comes by its id
        self._pending.pop()
        self.flights[batch.batch_id] = (waiter, on_chunk)
        if len(self.flights) >= self.max_in_flight:
            self.state = WorkerState.BUSY
        return waiter

    def _on_message(self, message: Message) -> None:
        if not self._serving or not isinstance(message, (Result, Chunk)):
            super()._on_message(message)  # Hello, InitFailed, Described: as any worker's
            return
        batch_id = message.batch_id
        if batch_id not in self.flights and batch_id == 0 and len(self.flights) == 1:
            batch_id = next(iter(self.flights))  # the answer to a frame it could not read
        if batch_id not in self.flights:
            log.error(
                "worker %s answered batch %d, which it does not hold; stopping it",
                self.worker_id, message.batch_id,
            )  # fmt: skip
            self.kill()  # its batches fail with its death
            return
        if isinstance(message, Chunk):
            on_chunk = self.flights[batch_id][1]
            if on_chunk is not None:
                on_chunk(message)
            return
        waiter, _ = self.flights.pop(batch_id)
        if self.state == WorkerState.BUSY:
            self.state = WorkerState.READY  # a free place, before its waiter runs
        if not waiter.done():
            waiter.set_result(message)

    def _fail_flights(self) -> None:
        """The worker died: every batch it held fails."""
        code = self.proc.returncode if self.proc is not None else None
        flights, self.flights = self.flights, {}
        for waiter, _ in flights.values():
            if not waiter.done():
                waiter.set_exception(
                    WorkerDied(f"worker {self.worker_id} died (exit status {code})")
                )


async def serve_concurrently(pool: WorkerPool, worker: AsyncWorkerProcess) -> None:
    """`worker`'s serving loop (see the module): collect a batch, send it, go on collecting
    while it runs; wait only when `max_in_flight` batches are out. Retired (cancelled, or
    RETIRING), it stops collecting and lets the batches it sent end first."""
    landing: set[asyncio.Task[None]] = set()
    dues: dict[int, float] = {}  # each batch in flight's deadline (loop time)
    jobs: list[Job] = []  # taken and not yet in a landing task's hands
    try:
        while worker.state in (WorkerState.READY, WorkerState.BUSY):
            if len(worker.flights) >= worker.max_in_flight:
                await asyncio.wait(landing, return_when=asyncio.FIRST_COMPLETED)
                continue
            collected = await pool._collect(worker)
            if collected is None:
                continue
            jobs = collected
            sent = pool._send(worker, jobs)
            jobs = []
            if sent is None:
                continue
            dues[sent.batch_id] = max(job.deadline for job in sent.jobs)
            pool._due[worker] = min(dues.values())  # `_send` set its own batch's
            task = asyncio.create_task(_land(pool, worker, sent, sent.batch_id, dues))
            landing.add(task)
            task.add_done_callback(landing.discard)
            with contextlib.suppress(WorkerDied):  # its death fails its batches
                await worker.drain()
    except asyncio.CancelledError:
        if worker.state != WorkerState.DEAD:
            raise  # retired, or the pool is closing
        log.warning("worker %s (pid %s) died while collecting", worker.worker_id, worker.pid)
    except Exception:
        log.exception("serving worker %s failed; replacing it", worker.worker_id)
        _fail(jobs, PredictionFailed(f"worker {worker.worker_id} failed; it is replaced"))
        worker.kill()
        await worker.dead.wait()
    finally:
        try:
            if landing:  # its batches end first (the watchdog bounds it); never cancelled here
                await asyncio.wait(landing)
        finally:  # also when a second cancel ends that wait: the landing tasks go on
            pool._serving_ended(worker)
    await pool._after_serving(worker)


async def _land(
    pool: WorkerPool, worker: AsyncWorkerProcess, sent: _Sent, batch_id: int, dues: dict[int, float]
) -> None:
    """Wait for one batch's result and answer its jobs."""
    try:
        result = await sent.result
    except TsctlError as exc:  # the worker died
        _fail(sent.jobs, exc)
        return
    finally:
        dues.pop(batch_id, None)
        pool._due[worker] = min(dues.values(), default=0.0)
    try:
        pool._answer(worker, sent.jobs, sent.at, result)
    except Exception:
        log.exception("answering a batch of worker %s failed; replacing it", worker.worker_id)
        _fail(sent.jobs, PredictionFailed(f"worker {worker.worker_id} failed; it is replaced"))
        worker.kill()
        return
    if not worker.recycling and pool._should_recycle(worker):
        worker.recycling = True
        log.info("recycling worker %s after %d requests", worker.worker_id, worker.served)
        pool._background(pool._replace(worker))


def _fail(jobs: list[Any], error: Exception) -> None:
    for job in jobs:
        job.answer(error)
