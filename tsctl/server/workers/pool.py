"""Worker processes and the pool that supervises them. Runs on the daemon's event loop.

`WorkerProcess` is one child (`python -m tsctl.worker`) connected by a socketpair; it sends a
batch, awaits the result frame, and reports its own death. `WorkerPool` keeps a model version's
target number of workers alive: one serving loop per worker takes batches from the model's
queue, a worker that dies fails only the requests it held and is restarted with exponential
backoff, a batch past its deadline gets its worker killed and replaced, and workers are
recycled gracefully after N requests or past an RSS limit. Nothing here blocks the loop:
process creation and socket I/O go through asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tsctl.errors import (
    BadRequest,
    InferenceTimeout,
    PredictionFailed,
    ServiceUnavailable,
    TsctlError,
    WorkerDied,
    prediction_failed,
)
from tsctl.ipc.codec import (
    INPUT_FAILURE_KIND,
    Assign,
    Batch,
    Chunk,
    Describe,
    Described,
    Failure,
    Hello,
    InitFailed,
    Message,
    ProtocolError,
    Result,
    Stop,
    WireRequest,
    encode,
    read_message,
)
from tsctl.server.batching import Job, ModelQueue, next_batch
from tsctl.server.telemetry.prometheus import HOSTNAME, Metrics
from tsctl.server.workers.spares import Spare, launch

log = logging.getLogger("tsctl.server")
model_log = logging.getLogger("tsctl.model")
metrics_log = logging.getLogger("tsctl.metrics.model")

MAX_BACKOFF = 30.0
_batch_ids = itertools.count(1)


class WorkerStartFailed(TsctlError):
    """A worker could not load its handler; the message carries the handler's own error."""

    http_status = 500
    type_name = "WorkerInitializationException"


@dataclass(frozen=True)
class Response:
    """What a worker answered for one request."""

    status: int
    content_type: str
    body: bytes | bytearray
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class PoolSettings:
    batch_size: int
    max_batch_delay: float  # ms
    startup_timeout: float  # s
    max_response_size: int
    recycle_after_requests: int = 0  # 0 = never
    recycle_above_rss_mb: int = 0  # 0 = never


class Child(Protocol):
    """The process handle a worker needs: what `asyncio.subprocess.Process` offers."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...

    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    def kill(self) -> None: ...
    async def wait(self) -> int: ...


class AdoptedChild:
    """A worker process started with `subprocess.Popen` (a spare), watched from the loop:
    its exit through a pidfd (a thread's blocking wait where there is none), its output
    through read pipes."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @classmethod
    async def adopt(cls, popen: subprocess.Popen[bytes]) -> AdoptedChild:
        child = cls(popen)
        loop = asyncio.get_running_loop()
        assert popen.stdout is not None and popen.stderr is not None
        child.stdout = await _stream_from(loop, popen.stdout)
        child.stderr = await _stream_from(loop, popen.stderr)
        child._exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: a thread waits instead
            waiting = loop.run_in_executor(None, popen.wait)
            waiting.add_done_callback(lambda f: child._set_exited(f.result()))
        else:
            loop.add_reader(pidfd, child._on_exit, loop, pidfd)
        return child

    def _on_exit(self, loop: asyncio.AbstractEventLoop, pidfd: int) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        self._set_exited(self._popen.wait())

    def _set_exited(self, code: int) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)

    def kill(self) -> None:
        if self._popen.returncode is None:
            self._popen.kill()

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)


async def _stream_from(loop: asyncio.AbstractEventLoop, pipe: Any) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


class WorkerProcess:
    """One worker child and its socket. `spare`, when given, is a process started ahead that
    this worker takes over instead of starting one."""

    def __init__(self, worker_id: str, spec: dict[str, Any], spare: Spare | None = None):
        self.worker_id = worker_id
        self.spec = spec
        self.spare = spare
        self._pumps: list[asyncio.Task[None]] = []
        self.proc: Child | None = None
        self.started_at = time.time()
        self.served = 0
        self.recycling = False
        self.state = "STARTING"
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        #: answers the worker owes, in the order it will send them, with who wants its chunks
        self._pending: deque[tuple[asyncio.Future[Any], Callable[[Chunk], None] | None]] = deque()
        self._reader_task: asyncio.Task[None] | None = None
        self.dead = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        if self.spare is not None:
            popen, parent = self.spare.popen, self.spare.sock
            self.spare = None
        else:
            # Popen's fork and exec take a few milliseconds: fine on the loop, and one way
            # of starting workers whether they are spares or not
            popen, parent = launch(preload=False)
        self.proc = await AdoptedChild.adopt(popen)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, logging.INFO, "stdout")),
            asyncio.create_task(self._pump(self.proc.stderr, logging.WARNING, "stderr")),
        ]
        self._reader, self._writer = await asyncio.open_connection(sock=parent)
        self._writer.writelines(encode(Assign({**self.spec, "worker_id": self.worker_id})))
        timeout = float(self.spec.get("startup_timeout", 120))
        try:
            first: Message = await asyncio.wait_for(read_message(self._reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            code = await self._reap()
            raise WorkerStartFailed(
                f"worker {self.worker_id} exited during start-up (exit status {code})"
            ) from None
        except TimeoutError:
            self.kill()
            await self._reap()
            raise WorkerStartFailed(
                f"worker {self.worker_id} did not load its handler within {timeout:g} s"
            ) from None
        if isinstance(first, InitFailed):
            await self._reap()
            raise WorkerStartFailed(first.failure.message)
        if not isinstance(first, Hello):
            self.kill()
            raise WorkerStartFailed(f"worker {self.worker_id} sent {type(first).__name__} first")
        self.state = "READY"
        self._reader_task = asyncio.create_task(self._read_loop())

    async def _pump(self, stream: asyncio.StreamReader, level: int, name: str) -> None:
        """Copy the worker's output, line by line, into model_log.log."""
        extra = {"worker": f"W-{self.worker_id}-{name}"}
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's limit
                line = await stream.read(1 << 16)
            if not line:
                return
            model_log.log(level, line.decode("utf-8", "replace").rstrip("\n"), extra=extra)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                message = await read_message(self._reader)
                if isinstance(message, Chunk) and self._pending:
                    on_chunk = self._pending[0][1]
                    if on_chunk is not None:
                        on_chunk(message)
                elif isinstance(message, (Result, Described)) and self._pending:
                    waiter, _ = self._pending.popleft()
                    if not waiter.done():
                        waiter.set_result(message)
                else:
                    log.warning("worker %s sent an unexpected %s", self.worker_id, message)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                log.error("worker %s: %s; stopping it", self.worker_id, exc)
                self.kill()
        finally:
            code = await self._reap()
            self.state = "DEAD"
            while self._pending:
                waiter, _ = self._pending.popleft()
                if not waiter.done():
                    waiter.set_exception(
                        WorkerDied(f"worker {self.worker_id} died (exit status {code})")
                    )
            self.dead.set()

    async def run(self, batch: Batch, on_chunk: Callable[[Chunk], None] | None = None) -> Result:
        """Send one batch and wait for its result; `WorkerDied` if the process goes away.
        Intermediate answers of a streaming handler go to `on_chunk` as they come."""
        if self.state != "READY" or self._writer is None:
            raise WorkerDied(f"worker {self.worker_id} is not running")
        self.state = "BUSY"
        try:
            result: Result = await self._ask(batch, on_chunk)
            return result
        finally:
            if self.state == "BUSY":
                self.state = "READY"

    async def describe(self) -> Described:
        """The handler's own description (`describe_handle`), queued behind any batch."""
        if self.state not in ("READY", "BUSY") or self._writer is None:
            raise WorkerDied(f"worker {self.worker_id} is not running")
        described: Described = await self._ask(Describe())
        return described

    async def _ask(
        self, message: Batch | Describe, on_chunk: Callable[[Chunk], None] | None = None
    ) -> Any:
        assert self._writer is not None
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((waiter, on_chunk))
        try:
            self._writer.writelines(encode(message))
            await self._writer.drain()
            return await waiter
        except ConnectionError:
            raise WorkerDied(f"worker {self.worker_id} closed its connection") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, timeout: float = 10) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout`."""
        if self.state == "DEAD":
            return
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.writelines(encode(Stop("stop")))
        self.state = "STOPPING"
        try:
            await asyncio.wait_for(self.dead.wait() if self._reader_task else self._reap(), timeout)
        except TimeoutError:
            self.kill()
            await self._reap()

    async def _reap(self) -> int | None:
        if self.proc is None:
            return None
        code = await self.proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)  # the output is all logged
        if self._writer is not None:
            self._writer.close()
        return code

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/statm", encoding="ascii") as fh:
                pages = int(fh.read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, ValueError, IndexError):
            return 0.0


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
    ) -> None:
        self.name = name
        self.model_name, self.version = model
        self.metrics = metrics
        self.queue = queue
        self.settings = settings
        self.make_worker = make_worker
        self.target = 0
        self.workers: list[WorkerProcess] = []
        self._loops: dict[WorkerProcess, asyncio.Task[None]] = {}
        self._ids = itertools.count(9000)
        self._failures = 0
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()

    def busy(self) -> bool:
        return any(w.state == "BUSY" for w in self.workers)

    async def scale(self, target: int) -> None:
        """Start or stop workers until `target` are running; raises if a new one fails."""
        self.target = target
        while len(self.workers) > target:
            await self._retire(self.workers[-1])
        starts = [self._start_one() for _ in range(target - len(self.workers))]
        results = await asyncio.gather(*starts, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _start_one(self) -> WorkerProcess:
        worker = self.make_worker(f"{next(self._ids)}-{self.name}")
        started = time.perf_counter()
        await worker.start()
        self.metrics.worker_load_time.set(
            (f"W-{worker.worker_id}", "Host", HOSTNAME), (time.perf_counter() - started) * 1000
        )
        if self._closed:
            await worker.stop()
            raise ServiceUnavailable(f"model {self.name} is being unloaded")
        self.workers.append(worker)
        self._loops[worker] = asyncio.create_task(self._serve(worker))
        log.info("worker %s started (pid %s)", worker.worker_id, worker.pid)
        return worker

    async def _serve(self, worker: WorkerProcess) -> None:
        settings = self.settings
        try:
            while worker.state == "READY":
                batch = await next_batch(
                    self.queue, settings.batch_size, settings.max_batch_delay, worker
                )
                await self._dispatch(worker, batch)
                if not worker.recycling and self._should_recycle(worker):
                    worker.recycling = True
                    log.info(
                        "recycling worker %s after %d requests", worker.worker_id, worker.served
                    )
                    self._background(self._replace(worker))
        finally:
            self._loops.pop(worker, None)
            self.queue.release(worker)
            if worker in self.workers:
                self.workers.remove(worker)
        if worker.state == "DEAD" and not self._closed:
            self.metrics.restarts.inc((self.model_name, self.version))
            self._schedule_restart()
        elif worker.state != "DEAD":
            await worker.stop()

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

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _should_recycle(self, worker: WorkerProcess) -> bool:
        s = self.settings
        if s.recycle_after_requests and worker.served >= s.recycle_after_requests:
            return True
        return bool(s.recycle_above_rss_mb and worker.rss_mb() > s.recycle_above_rss_mb)

    async def _dispatch(self, worker: WorkerProcess, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        batch = Batch(
            next(_batch_ids),
            [WireRequest(j.request.request_id, j.request.parts, j.request.headers) for j in live],
        )
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._record_dispatch(live, now)
        watchdog = loop.call_at(max(j.deadline for j in live), self._overdue, worker)
        try:
            result = await worker.run(batch, _fan_out(live))
        except WorkerDied as exc:
            _fail(live, exc)
            return
        finally:
            watchdog.cancel()
        worker.served += len(live)
        self._failures = 0
        self._record_result(result, live, (loop.time() - now) * 1000)
        if result.failure is not None:
            _fail(live, _failure_error(result.failure))
            return
        limit = self.settings.max_response_size
        for job, answer in zip(live, result.responses, strict=True):
            if job.future.done():
                continue
            if answer.failure is not None:
                job.future.set_exception(_failure_error(answer.failure))
            elif len(answer.body) > limit:
                job.future.set_exception(
                    PredictionFailed(
                        f"the response of {len(answer.body)} bytes exceeds "
                        f"max_response_size ({limit})"
                    )
                )
            else:
                job.future.set_result(
                    Response(
                        answer.status,
                        answer.content_type,
                        answer.body,
                        tuple(answer.headers),
                        answer.reason,
                    )
                )

    def _record_dispatch(self, jobs: list[Job], now: float) -> None:
        stats = self.metrics
        labels = (self.model_name, self.version, HOSTNAME)
        waited = [now - job.request.arrival for job in jobs]
        stats.queue_latency.inc(labels, sum(waited) * 1e6)
        stats.queue_time.set(("Host", HOSTNAME), waited[-1] * 1000)
        stats.batch_size.observe((self.model_name, self.version), len(jobs))

    def _record_result(self, result: Result, jobs: list[Job], batch_ms: float) -> None:
        stats = self.metrics
        backend = (self.model_name, "Model", HOSTNAME)
        stats.handler_time.set(backend, result.handler_ms)
        stats.prediction_time.set(backend, result.handler_ms)
        stats.worker_thread_time.set(("Host", HOSTNAME), max(0.0, batch_ms - result.handler_ms))
        stamp = time.time()
        metrics_log.info(
            "PredictionTime.ms:%.2f|#ModelName:%s,Level:Model|#hostname:%s,requestID:%s,"
            "timestamp:%d",
            result.handler_ms, self.model_name, HOSTNAME, jobs[0].request.request_id, stamp,
        )  # fmt: skip
        for metric in result.metrics:
            stats.custom(metric.name, metric.unit, metric.kind, metric.value, metric.dimensions)
            dims = ",".join(f"{k}:{v}" for k, v in metric.dimensions.items())
            metrics_log.info(
                "%s.%s:%s|#%s|#hostname:%s,timestamp:%d",
                metric.name, metric.unit, metric.value, dims, HOSTNAME, stamp,
            )  # fmt: skip

    def _overdue(self, worker: WorkerProcess) -> None:
        log.error("worker %s overran the response timeout; replacing it", worker.worker_id)
        worker.kill()

    def _schedule_restart(self) -> None:
        if len(self.workers) + len(self._tasks) >= self.target:
            return
        delay = 0.0 if self._failures == 0 else min(MAX_BACKOFF, 2.0 ** (self._failures - 1))
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
            self._schedule_restart_later()

    def _schedule_restart_later(self) -> None:
        # called from inside a restart task, which is still in self._tasks
        delay = min(MAX_BACKOFF, 2.0**self._failures)
        self._failures += 1
        task = asyncio.create_task(self._restart_after(delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, worker: WorkerProcess) -> None:
        """Stop one worker after its current batch; an idle one stops at once."""
        if worker in self.workers:
            self.workers.remove(worker)
        loop_task = self._loops.get(worker)
        if loop_task is not None and worker.state == "READY":
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        elif loop_task is not None:
            worker.state = "RETIRING"
            await asyncio.gather(loop_task, return_exceptions=True)
        await worker.stop()

    async def close(self, error: TsctlError) -> None:
        """Stop every worker (after in-flight batches) and fail what is still queued."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._retire(w) for w in list(self.workers)))
        self.queue.drop_all(error)


def _fan_out(jobs: list[Job]) -> Callable[[Chunk], None] | None:
    """Deliver each intermediate answer of a chunk to its request, if it asked for chunks."""
    if not any(job.on_chunk is not None for job in jobs):
        return None

    def deliver(chunk: Chunk) -> None:
        for job, answer in zip(jobs, chunk.responses, strict=False):
            if job.on_chunk is not None and not job.future.done() and answer.failure is None:
                job.on_chunk(
                    Response(answer.status, answer.content_type, answer.body, tuple(answer.headers))
                )

    return deliver


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


def expire(job: Job, timeout: float) -> None:
    """A job's deadline passed: answer it with a timeout, wherever it is."""
    if not job.future.done():
        job.future.set_exception(
            InferenceTimeout(f"no answer within the response timeout of {timeout:g} s")
        )


def _failure_error(failure: Failure) -> TsctlError:
    """The error a worker's failure is answered with: a request the envelope could not read
    is the client's mistake (400); anything else is a failed prediction, with the status the
    handler chose, if it chose one (TorchServe's `PredictionException`)."""
    if failure.kind == INPUT_FAILURE_KIND:
        return BadRequest(failure.message)
    return prediction_failed(failure.message, failure.status)
