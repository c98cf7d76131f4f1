"""A worker of an `asyncCommunication: true` model: several batches in flight at once.

TorchServe's `ts/async_service.py` semantics: the handler's `async def handle` runs on one
asyncio event loop, and the worker does not wait for a batch's answer before it takes the next
one. Each `Batch` becomes a task of its own, with its own copy of the handler's context
(`request_ids`, request headers, `send_intermediate`: TorchServe copies it per batch too), and
its `Result` is sent as soon as it is done, whatever order the batches finish in: the frontend
matches results (and a streaming handler's `Chunk`s) to batches by their id, and it bounds how
many batches one worker holds (`maxBatchesInFlight`).

Threads: the main thread runs the event loop, where the handler, `describe_handle` and every
write to the socket run (whole frames, blocking: the frontend reads as they come, and frames
never interleave). A reader thread does the blocking reads of frames and hands each to the loop
(`call_soon_threadsafe`). The loop is created before the handler loads, so what `initialize`
makes (queues, an engine's background tasks) belongs to it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import io
import logging
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any

from tsctl.ipc.codec import FrameRejected, recv_message, send_message
from tsctl.ipc.messages import (
    Batch,
    Describe,
    Described,
    Failure,
    FailureKind,
    Kind,
    Message,
    Result,
    Stop,
)
from tsctl.worker.service import Service

log = logging.getLogger("tsctl.worker")
#: how the worker's entry point sends an answer (with the failure to send instead when the
#: answer cannot be encoded): `tsctl.worker.__main__._send`
Send = Callable[[Any, Callable[[Failure], Any]], None]
#: seconds the batches still running when the worker stops get to end once cancelled
STOP_GRACE = 1.0


def new_loop() -> asyncio.AbstractEventLoop:
    """The worker's event loop, current on the main thread (before the handler loads)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def serve(
    sock: socket.socket,
    stream: io.BufferedReader,
    service: Service,
    loop: asyncio.AbstractEventLoop,
    before_batch: Callable[[], None],
    send: Send,
) -> int:
    """Serve batches until `Stop` or the socket's end; the worker's exit status."""
    service.awaits = True
    runner = _Runner(sock, service, loop, before_batch, send)
    reader = threading.Thread(target=runner.read, args=(stream,), name="tsctl-frames", daemon=True)
    reader.start()
    try:
        return loop.run_until_complete(runner.finished)
    finally:
        runner.cancel_running()
        loop.close()


class _Runner:
    """The loop's side: one task per batch, answers sent as each ends. Loop thread only,
    but `read`, which is the reader thread."""

    def __init__(
        self,
        sock: socket.socket,
        service: Service,
        loop: asyncio.AbstractEventLoop,
        before_batch: Callable[[], None],
        send: Send,
    ) -> None:
        self.sock = sock
        self.service = service
        self.loop = loop
        self.before_batch = before_batch
        self.send = send
        self.finished: asyncio.Future[int] = loop.create_future()
        self.running: set[asyncio.Task[None]] = set()

    def read(self, stream: io.BufferedReader) -> None:
        """The reader thread: every frame goes to the loop, in order, until the stream ends."""
        while True:
            try:
                incoming: Message | FrameRejected = recv_message(stream, recover=True)
            except FrameRejected as exc:
                incoming = exc
            except EOFError:
                self.loop.call_soon_threadsafe(self.finish, 0)
                return
            except Exception:  # a broken stream: nothing more can be read
                log.error("reading a frame failed:\n%s", traceback.format_exc())
                self.loop.call_soon_threadsafe(self.finish, 1)
                return
            self.loop.call_soon_threadsafe(self.dispatch, incoming)
            if isinstance(incoming, Stop):
                return

    def finish(self, code: int) -> None:
        if not self.finished.done():
            self.finished.set_result(code)

    def dispatch(self, incoming: Message | FrameRejected) -> None:
        if isinstance(incoming, Batch):
            self.before_batch()
            task = self.loop.create_task(self.run(incoming))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        elif isinstance(incoming, Describe):
            self.send(self.service.describe(), lambda failure: Described(failure=failure))
        elif isinstance(incoming, Stop):
            self.finish(0)
        elif isinstance(incoming, FrameRejected):
            log.error("could not read a frame of kind %d: %s", incoming.kind, incoming)
            failure = Failure(FailureKind.BAD_FRAME, f"the worker could not read it: {incoming}")
            if incoming.kind == Kind.BATCH:  # the frontend matches it to its batch if it can
                send_message(self.sock, Result(0, failure=failure))
            elif incoming.kind == Kind.DESCRIBE:
                send_message(self.sock, Described(failure=failure))

    async def run(self, batch: Batch) -> None:
        """One batch, on a copy of the service whose context is this batch's own."""
        mine = copy.copy(self.service)
        mine.context = copy.copy(self.service.context)
        if (isolate := getattr(mine.context.metrics, "isolate", None)) is not None:
            isolate()  # this task's metrics are this batch's alone
        try:
            result = await mine.run_batch(batch, functools.partial(send_message, self.sock))
        except Exception as exc:
            log.error("running a batch failed:\n%s", traceback.format_exc())
            failure = Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            result = Result(batch.batch_id, failure=failure)
        try:
            self.send(result, lambda failure: Result(batch.batch_id, failure=failure))
        except OSError:  # the socket is gone: nothing can be answered any more
            self.finish(1)

    def cancel_running(self) -> None:
        """Cancel the batches still running (the worker is stopping) and let them end."""
        if not self.running:
            return
        for task in self.running:
            task.cancel()
        self.loop.run_until_complete(asyncio.wait(list(self.running), timeout=STOP_GRACE))
