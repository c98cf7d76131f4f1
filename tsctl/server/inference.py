"""The one request path every API adapter uses: an `InferenceRequest` in, a `Response` out.

Runs on the daemon's event loop. `submit` puts a job on the model's queue (raising
`QueueFull` at once when it is full) and arms the job's deadline (counted from arrival,
queue time included, one timer per model version's queue: `tsctl.server.deadlines`). The
answer goes to the job's `on_answer`, called directly by whatever answers the job (no future,
no scheduled callback: the REST exchanges), or to a future (`Pending`, to `await result()`:
the gRPC calls). A request whose input names and headers would not fit a worker frame (a
form body of a million fields, names full of escaped control characters) is refused here,
alone, with 413 (`RequestTooLarge`): its batch-mates and the worker never see it. A caller
whose client has gone away calls `job.answer(ClientGone())` (`Pending.abandon()`): the job
is dropped before it reaches a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

from tsctl.errors import RequestTooLarge, ServiceUnavailable
from tsctl.ipc.codec import entry_size, request_entry, request_meta_budget
from tsctl.server.registry import ModelVersion
from tsctl.server.request import ClientGone, InferenceRequest, Job, Response


def frame_entry(request: InferenceRequest, batch_size: int) -> bytes:
    """`request`'s entry in a batch frame's meta (`codec.request_entry`), encoded once, here;
    `RequestTooLarge` if it would make a batch frame's meta exceed its bound."""
    entry = request_entry(request)
    size = entry_size(entry, request.parts)
    budget = request_meta_budget(batch_size)
    if size > budget:
        raise RequestTooLarge(
            f"the request's input names and headers take {size} bytes in a worker frame, over "
            f"the limit of {budget} bytes for this model (batch size {batch_size}): "
            f"send fewer or shorter form fields ({len(request.parts)} were sent)"
        )
    return entry


def submit(
    mv: ModelVersion,
    request: InferenceRequest,
    source: Hashable | None,
    on_answer: Callable[[Response | BaseException], None] | None = None,
    on_chunk: Callable[[Response], None] | None = None,
    sequence: str | None = None,
    future: asyncio.Future[Response] | None = None,
) -> Job:
    """Queue `request` on `mv` and arm its deadline. Its answer goes to `future` when one is
    given (the caller settles the job, as `Pending.result` does), else to `on_answer`, called
    directly by whatever answers the job (a worker's batch, its deadline, the queue closing,
    `job.answer(ClientGone())` from a caller whose client went away), after the queue's
    bookkeeping. A stateful model's request joins its session (`tsctl.server.sessions`:
    `sequence`, else its `ts_request_sequence_id` header, else a new one: `job.sequence`)."""
    if mv.pool.target == 0:
        raise ServiceUnavailable(
            f'Model "{mv.name}" has no worker to serve inference request. '
            "Please use scale workers API to add workers."
        )
    queue = mv.queue
    sessions = queue.sessions
    if sessions is None:
        return _queued(mv, request, source, on_answer, on_chunk, sequence, future)
    # a stateful model: every request is in a session; one it opened for a request that
    # is refused (413, a full queue) closes again, holding no maxNumSequence place
    request, sequence = sessions.admit(request, sequence)
    try:
        return _queued(mv, request, source, on_answer, on_chunk, sequence, future)
    except Exception:
        sessions.unopen(sequence)
        raise


def _queued(
    mv: ModelVersion,
    request: InferenceRequest,
    source: Hashable | None,
    on_answer: Callable[[Response | BaseException], None] | None,
    on_chunk: Callable[[Response], None] | None,
    sequence: str | None,
    future: asyncio.Future[Response] | None,
) -> Job:
    queue = mv.queue
    entry = frame_entry(request, mv.batch_size)
    job = Job(
        request,
        future,
        request.arrival + mv.response_timeout,
        source,
        on_chunk=on_chunk,
        sequence=sequence,
        on_answer=on_answer,
        entry=entry,
        settle=None if future is not None else queue.settle,
    )
    queue.put(job)
    queue.deadlines.add(job, mv.response_timeout)
    return job


class Pending:
    """A submitted request to `await result()` (gRPC's calls), or to `abandon()`."""

    def __init__(
        self,
        mv: ModelVersion,
        request: InferenceRequest,
        source: Hashable | None,
        on_chunk: Callable[[Response], None] | None = None,
        sequence: str | None = None,
    ):
        self.mv = mv
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.future = future
        self.job = submit(mv, request, source, None, on_chunk, sequence, future)

    async def result(self) -> Response:
        """Wait for the answer (raises the request's error)."""
        try:
            return await self.future
        finally:
            self.job.done = True  # also when this wait was cancelled (the call's client left)
            self.mv.queue.settle(self.job)

    def abandon(self) -> None:
        self.job.answer(ClientGone())
