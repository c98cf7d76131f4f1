"""One worker process as the daemon sees it. Runs on the daemon's event loop.

`WorkerProcess` is one child (`python -m tsctl.worker`) connected by a socketpair: it hands the
child its `WorkerSpec`, waits for `Hello`, then sends batches and describe calls and awaits
their answers in order, passing a streaming handler's chunks on as they come, and reports its
own death (`dead`, and the callbacks given to `when_dead`) as soon as it happens, busy or idle:
the child's exit is watched (a pidfd) besides its socket, which a grandchild may hold open.
A response body over `max_body` is never read into memory (`tsctl.ipc.codec.read_message`).
Its output is copied line by line into model_log.log. Nothing here blocks the loop: process
creation takes a few milliseconds, socket I/O goes through asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from tsctl.errors import RequestTooLarge, WorkerDied, WorkerStartFailed
from tsctl.ipc.codec import FrameReader, FrameTooLarge, ProtocolError, encode
from tsctl.ipc.messages import (
    Assign,
    Batch,
    Chunk,
    Describe,
    Described,
    Hello,
    InitFailed,
    Message,
    Result,
    Stop,
    WorkerSpec,
    WorkerState,
)
from tsctl.server.workers.spares import Spare, spawn

log = logging.getLogger("tsctl.server")
model_log = logging.getLogger("tsctl.model")
#: seconds a dead worker's output pipes may stay open (held by a process it forked) before
#: the worker is reported dead without the rest of its output
OUTPUT_GRACE = 2.0
#: the most frame bytes held back while one read's results are handled (`_Link.cork`): more
#: go at once, in order
CORK_MAX = 64 << 10


#: who gets an answer the worker owes: a future, or a callback (`WorkerProcess.send_then`)
_Waiter = asyncio.Future[Any] | Callable[[Any], None]


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


class Launcher(Protocol):
    """Starts a worker otherwise than `spawn`: the ranks of a multi-process instance
    (`tsctl.server.workers.torchrun`), its child the process that watches them."""

    def spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]: ...
    async def adopt(self, popen: subprocess.Popen[bytes]) -> Child: ...


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


class _Link(asyncio.Protocol):
    """The daemon's end of a worker's socket: frames are decoded as bytes arrive and handed
    to `on_messages` (those one read completed) in the same turn of the loop; `on_lost` is
    called once, with the reason (None at a clean end of stream). Writes respect the
    transport's flow control (`drain`).

    A frame is never sent on its own the moment it is written: what is written in one turn
    of the event loop goes in one send at the end of that turn (the requests that several
    clients' reads queued in one turn reach an idle worker together), or earlier, at
    `uncork`, when a read's results are handled (`cork`)."""

    def __init__(
        self,
        max_body: int | None,
        on_messages: Callable[[list[Message]], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self.reader = FrameReader(max_body)
        self.on_messages = on_messages
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._paused: asyncio.Future[None] | None = None
        self._lost = False
        #: frames written and not sent yet, sent together by `uncork` (None: nothing held);
        #: `_corked_size` bytes of them
        self._corked: list[bytes | bytearray | memoryview] | None = None
        self._corked_size = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except ProtocolError as exc:
            self._lose(exc)
            return
        if messages:
            self.on_messages(messages)

    def eof_received(self) -> bool:
        return False  # close: a worker's end of stream is its end

    def connection_lost(self, exc: Exception | None) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_exception(ConnectionResetError("the worker's socket closed"))
        self._lose(exc)  # an end of stream within a frame is an exit, not an error

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self.transport is not None:
            self.transport.close()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def write(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the worker's socket is closed")
        corked = self._corked
        if corked is None:  # the first frame of this turn: sent at its end with any after it
            self._corked, self._corked_size = list(buffers), sum(map(len, buffers))
            assert self._loop is not None
            self._loop.call_soon(self.uncork)
            return
        size = self._corked_size + sum(map(len, buffers))
        if size <= CORK_MAX:
            corked.extend(buffers)
            self._corked_size = size
            return
        self.uncork()  # in order: what is held, then this frame
        self.cork()
        self.transport.writelines(buffers)

    def cork(self) -> None:
        """Hold the frames written from now until `uncork`, then send them in one call (a
        turn's frames are held anyway; this holds them past the turn's end, until `uncork`)."""
        if self._corked is None:
            self._corked, self._corked_size = [], 0

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(corked)

    async def drain(self) -> None:
        if self._paused is not None and not self._paused.done():
            await asyncio.shield(self._paused)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def backlog(self) -> int:
        """Bytes written that the socket has not taken yet (held in the transport)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    @property
    def lost(self) -> bool:
        return self._lost


async def _stream_from(loop: asyncio.AbstractEventLoop, pipe: Any) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


class WorkerProcess:
    """One worker child and its socket. `spare`, when given, is a process started ahead that
    this worker takes over instead of starting one."""

    def __init__(
        self,
        spec: WorkerSpec,
        spare: Spare | None = None,
        max_body: int | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.worker_id = spec.worker_id
        self.max_body = max_body
        self.spec = spec
        self.spare = spare
        self.launcher = launcher
        self._pumps: list[asyncio.Task[None]] = []
        self.proc: Child | None = None
        self.started_at = time.time()
        self.served = 0
        self.recycling = False
        self.state = WorkerState.STARTING
        self._writer: _Link | None = None
        #: the worker's first message (Hello or InitFailed); None if its socket ended first
        self._first: asyncio.Future[Message | None] | None = None
        self._death: asyncio.Task[None] | None = None
        #: answers the worker owes, in the order it will send them, with who wants its chunks:
        #: each answer goes to a future (`send`, `describe`) or to a callback (`send_then`)
        self._pending: deque[tuple[_Waiter, Callable[[Chunk], None] | None]] = deque()
        #: batches written and not answered (more than one when some wait behind: `send_then`)
        self._batches = 0
        self._serving = False  # past its Hello: its socket's end is its death
        self._exit_watch: asyncio.Task[None] | None = None
        self.dead = asyncio.Event()
        self._on_dead: list[Callable[[], None]] = []
        #: given a function that handles several messages read at once, runs it (the pool
        #: sets it: it writes their batches' metric lines once, before their answers)
        self.grouped: Callable[[Callable[[], None]], None] | None = None

    def when_dead(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) once this worker has died or stopped, after `dead`."""
        self._on_dead.append(callback)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        if self.launcher is not None:  # several processes (tsctl.server.workers.torchrun)
            popen, parent = self.launcher.spawn()
        elif self.spare is not None:
            popen, parent = self.spare.popen, self.spare.sock
            self.spare = None
        else:
            # Popen's fork and exec take a few milliseconds: fine on the loop, and one way
            # of starting workers whether they are spares or not
            popen, parent = spawn(preload=False)
        if self.launcher is not None:
            self.proc = await self.launcher.adopt(popen)
        else:
            self.proc = await AdoptedChild.adopt(popen)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, logging.INFO, "stdout")),
            asyncio.create_task(self._pump(self.proc.stderr, logging.WARNING, "stderr")),
        ]
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        _, self._writer = await loop.create_connection(
            lambda: _Link(self.max_body, self._on_messages, self._on_lost), sock=parent
        )
        self._writer.write(encode(Assign(self.spec)))
        timeout = self.spec.startup_timeout
        try:
            first = await asyncio.wait_for(self._first, timeout)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # cancelled in the turn the first message (or the end) came: wait_for returned
                # it and dropped the cancellation; honour it (a stop cancels starts)
                raise asyncio.CancelledError
            if first is None:
                raise ConnectionResetError
        except ConnectionError:
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
        self.state = WorkerState.READY
        self._serving = True
        if self._writer.lost:  # its socket ended since the Hello
            self._death = asyncio.ensure_future(self._report_death())
        self._exit_watch = asyncio.create_task(self._watch_exit())

    async def _watch_exit(self) -> None:
        """The child exited: end the read loop even if its socket stays open (a process the
        handler forked may hold it)."""
        assert self.proc is not None
        await self.proc.wait()
        if self._writer is not None:
            self._writer.close()

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

    def _on_messages(self, messages: list[Message]) -> None:
        """The messages one read completed, in order (through `grouped` when several). The
        batches their results make room for are written in one call (`flush_writes`, which
        the pool calls before it answers a batch: a worker that fell idle waits for no
        answer; here at the end in case none was answered)."""
        writer = self._writer
        if writer is not None:
            writer.cork()

        def handle() -> None:
            for message in messages:
                self._on_message(message)

        try:
            if len(messages) > 1 and self.grouped is not None:
                self.grouped(handle)
            else:
                handle()
        finally:
            self.flush_writes()

    def flush_writes(self) -> None:
        """Send the frames held while a read's results are handled (`_on_messages`)."""
        writer = self._writer
        if writer is not None:
            writer.uncork()

    def _on_message(self, message: Message) -> None:
        """A message from the worker, in the turn its last byte arrived."""
        if not self._serving:
            if self._first is not None and not self._first.done():
                self._first.set_result(message)
            else:
                log.warning("worker %s sent an unexpected %s", self.worker_id, message)
        elif isinstance(message, Chunk) and self._pending:
            on_chunk = self._pending[0][1]
            if on_chunk is not None:
                on_chunk(message)
        elif isinstance(message, (Result, Described)) and self._pending:
            waiter, _ = self._pending.popleft()
            if isinstance(message, Result):
                self._batches -= 1
                if self.state == WorkerState.BUSY and not self._batches:
                    self.state = WorkerState.READY  # before its waiter runs: it may send the next
            if not isinstance(waiter, asyncio.Future):
                waiter(message)  # `send_then`'s callback, in this turn
            elif not waiter.done():
                waiter.set_result(message)
        else:
            log.warning("worker %s sent an unexpected %s", self.worker_id, message)

    def _on_lost(self, exc: Exception | None) -> None:
        """The worker's socket ended (`exc`: why, when it was not a clean end of stream)."""
        if exc is not None:
            if isinstance(exc, ConnectionResetError):  # it exited with a batch unread (behind)
                log.warning("worker %s closed its socket with a batch unread", self.worker_id)
            else:
                log.error("worker %s: %s; stopping it", self.worker_id, exc)
            self.kill()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if self._serving:
            self._death = asyncio.ensure_future(self._report_death())

    async def _report_death(self) -> None:
        code = await self._reap()
        self.state = WorkerState.DEAD
        while self._pending:
            waiter, _ = self._pending.popleft()
            died = WorkerDied(f"worker {self.worker_id} died (exit status {code})")
            if not isinstance(waiter, asyncio.Future):
                waiter(died)
            elif not waiter.done():
                waiter.set_exception(died)
        self.dead.set()
        for callback in self._on_dead:
            callback()

    def send(
        self, batch: Batch, on_chunk: Callable[[Chunk], None] | None = None
    ) -> asyncio.Future[Result]:
        """Write one batch now and return the future of its result (`WorkerDied` if the
        process goes away); the worker is BUSY until the result arrives. Intermediate answers
        of a streaming handler go to `on_chunk` as they come. `RequestTooLarge` (nothing
        written) for a batch whose frame exceeds the codec's limit; call `drain` after."""
        if self.state != WorkerState.READY or self._writer is None:
            raise WorkerDied(f"worker {self.worker_id} is not running")
        waiter: asyncio.Future[Result] = self._write(batch, on_chunk)
        self._batches += 1
        self.state = WorkerState.BUSY
        return waiter

    def send_then(
        self,
        batch: Batch,
        on_result: Callable[[Result | WorkerDied], None],
        on_chunk: Callable[[Chunk], None] | None = None,
        behind: bool = False,
    ) -> None:
        """`send`, with the result handed to `on_result` instead of a future: called in the
        loop turn the result's last byte arrives (or with `WorkerDied` as the death is
        reported), so whoever waits for it runs without a task switch. `on_result` must not
        raise. No `drain` needed between batches sent this way: the worker reads a whole
        frame before it answers, so when its result arrives its socket has taken the frame.
        `behind`: the worker may be BUSY, and this batch waits in its socket until the one
        it runs is answered (it still runs one batch at a time, in the order sent)."""
        state = self.state
        if self._writer is None or not (
            state == WorkerState.READY or (behind and state == WorkerState.BUSY)
        ):
            raise WorkerDied(f"worker {self.worker_id} is not running")
        self._write(batch, on_chunk, on_result)
        self._batches += 1
        self.state = WorkerState.BUSY

    async def drain(self) -> None:
        """Until the socket takes more (a large batch frame is being written)."""
        assert self._writer is not None
        try:
            await self._writer.drain()
        except ConnectionError:
            raise WorkerDied(f"worker {self.worker_id} closed its connection") from None

    async def run(self, batch: Batch, on_chunk: Callable[[Chunk], None] | None = None) -> Result:
        """Send one batch and wait for its result (`send`, then the result)."""
        waiter = self.send(batch, on_chunk)
        try:
            await self.drain()
            return await waiter
        finally:
            if self.state == WorkerState.BUSY:  # cancelled, or failed before the answer
                self.state = WorkerState.READY

    async def describe(self) -> Described:
        """The handler's own description (`describe_handle`), queued behind any batch."""
        if not self.state.serving or self._writer is None:
            raise WorkerDied(f"worker {self.worker_id} is not running")
        waiter: asyncio.Future[Described] = self._write(Describe())
        await self.drain()
        return await waiter

    def _write(
        self,
        message: Batch | Describe,
        on_chunk: Callable[[Chunk], None] | None = None,
        on_result: Callable[[Any], None] | None = None,
    ) -> Any:
        """Write `message`'s frame and queue who gets its answer: `on_result`, or the future
        returned (None with `on_result`)."""
        assert self._writer is not None
        try:
            frame = encode(message)
        except FrameTooLarge as exc:  # nothing was written: the worker is unaffected
            raise RequestTooLarge(f"the batch cannot be sent to a worker: {exc}") from None
        try:
            self._writer.write(frame)
        except ConnectionError:
            raise WorkerDied(f"worker {self.worker_id} closed its connection") from None
        if on_result is not None:
            self._pending.append((on_result, on_chunk))
            return None
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((waiter, on_chunk))
        return waiter

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, timeout: float = 10) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout`."""
        if self.state == WorkerState.DEAD:
            return
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.write(encode(Stop("stop")))
        self.state = WorkerState.STOPPING
        try:
            await asyncio.wait_for(self.dead.wait() if self._serving else self._reap(), timeout)
        except TimeoutError:
            self.kill()
            await self._reap()

    async def _reap(self) -> int | None:
        if self.proc is None:
            return None
        code = await self.proc.wait()
        if self._pumps:  # the output is all logged, unless a process it forked holds the pipes
            _, held = await asyncio.wait(self._pumps, timeout=OUTPUT_GRACE)
            for pump in held:
                pump.cancel()
        if self._writer is not None:
            self._writer.close()
        return code

    def write_backlog(self) -> int:
        """Bytes of frames written to the worker that its socket has not taken yet."""
        return 0 if self._writer is None else self._writer.backlog()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/statm", encoding="ascii") as fh:
                pages = int(fh.read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, ValueError, IndexError):
            return 0.0
