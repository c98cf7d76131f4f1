"""The one request path every API adapter uses: an `InferenceRequest` in, a `Response` out.

Runs on the daemon's event loop. `predict` puts a job on the model's queue (raising
`QueueFull` at once when it is full), arms the job's deadline (counted from arrival, queue
time included) and hands back a worker's answer, to `await result()` or to a `when_done`
callback (one timer per model version's queue times the deadlines: `tsctl.server.deadlines`).
A request whose input names and headers would not fit a worker frame (a form body of
a million fields, names full of escaped control characters) is refused here, alone, with 413
(`RequestTooLarge`): its batch-mates and the worker never see it. A caller whose client has
gone away calls `Pending.abandon()`: the job is dropped before it reaches a worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

from tsctl.errors import RequestTooLarge, ServiceUnavailable
from tsctl.ipc.codec import request_meta_bound, request_meta_budget
from tsctl.server.registry import ModelVersion
from tsctl.server.request import ClientGone, InferenceRequest, Job, Response


def check_frame_size(request: InferenceRequest, batch_size: int) -> None:
    """`RequestTooLarge` if `request` would make a batch frame's meta exceed its bound."""
    size = request_meta_bound(request.request_id, request.parts, request.headers)
    budget = request_meta_budget(batch_size)
    if size > budget:
        raise RequestTooLarge(
            f"the request's input names and headers take {size} bytes in a worker frame, over "
            f"the limit of {budget} bytes for this model (batch size {batch_size}): "
            f"send fewer or shorter form fields ({len(request.parts)} were sent)"
        )


class Pending:
    """A submitted request: await `result()`, or `abandon()` it."""

    def __init__(
        self,
        mv: ModelVersion,
        request: InferenceRequest,
        source: Hashable | None,
        on_chunk: Callable[[Response], None] | None = None,
        sequence: str | None = None,
    ):
        if mv.pool.target == 0:
            raise ServiceUnavailable(
                f'Model "{mv.name}" has no worker to serve inference request. '
                "Please use scale workers API to add workers."
            )
        check_frame_size(request, mv.batch_size)
        loop = asyncio.get_running_loop()
        self.mv = mv
        deadline = request.arrival + mv.response_timeout
        self.job = Job(
            request,
            loop.create_future(),
            deadline,
            source,
            on_chunk=on_chunk,
            sequence=sequence,
        )
        mv.queue.put(self.job)
        mv.queue.deadlines.add(self.job, mv.response_timeout, loop)

    async def result(self) -> Response:
        """Wait for the answer (raises the request's error)."""
        try:
            response: Response = await self.job.future
            return response
        finally:
            self._settle()

    def when_done(self, callback: Callable[[Response | BaseException], None]) -> None:
        """Call `callback` with the answer or the error once there is one (no task needed)."""

        def done(future: asyncio.Future[Any]) -> None:
            self._settle()
            error = ClientGone() if future.cancelled() else future.exception()
            callback(error if error is not None else future.result())

        self.job.future.add_done_callback(done)

    def _settle(self) -> None:
        job = self.job
        queue = self.mv.queue
        queue.deadlines.answered(job)
        queue.answered(job.source, time.monotonic())  # the event loop's clock

    def abandon(self) -> None:
        if not self.job.future.done():
            self.job.future.set_exception(ClientGone())
