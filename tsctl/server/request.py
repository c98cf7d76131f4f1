"""The request types every part of the daemon shares: what an API adapter submits
(`InferenceRequest`), what a worker answered (`Response`), and a queued `Job`.

Plain data, importing nothing of the daemon: the API adapters, the batcher and the worker pool
all depend on this module, never on each other for these types. Event-loop only.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from random import getrandbits

from tsctl.ipc.messages import WireRequest, value_class

log = logging.getLogger("tsctl.server")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a token: safe in a header line


@value_class
class InferenceRequest(WireRequest):
    """One prediction request, whatever API it came from: what a worker's batch frame
    carries of it (a `WireRequest`: the batch is sent with these objects), and when it
    arrived."""

    arrival: float = 0.0  # loop.time() when the request arrived


@value_class
class Response:
    """What a worker answered for one request."""

    status: int
    content_type: str
    body: bytes | bytearray
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""


@dataclass(eq=False, slots=True)
class Job:
    """One request waiting for, or being run by, a worker; answered once (`answer`).

    Its answer goes to `future` when it has one (an awaiting caller: gRPC), else straight to
    `on_answer`, called from whatever answers it (the worker pool, the deadline timer, the
    queue, a client that went away): no future, no scheduled callback. Before `on_answer`,
    `settle` (the queue's bookkeeping) is called with the job. A job is answered only through
    `answer` (`done` says whether it was), never by completing its future directly."""

    request: InferenceRequest
    future: asyncio.Future[Response] | None
    deadline: float
    #: who sent it (an HTTP/1.1 connection, a gRPC peer): the batcher's arrival hints
    source: Hashable | None = None
    #: its own deadline timer, when it has one (`tsctl.server.deadlines`: most share one)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    #: receives a streaming handler's intermediate answers
    on_chunk: Callable[[Response], None] | None = field(default=None, repr=False)
    #: a stateful sequence (gRPC `sequence_id`): all its jobs go to the same worker, in order
    sequence: str | None = None
    #: receives the answer or the error, when there is no `future`
    on_answer: Callable[[Response | BaseException], None] | None = field(default=None, repr=False)
    #: its entry in a batch frame's meta, encoded when it was queued (`codec.request_entry`)
    entry: bytes = field(default=b"", repr=False)
    #: called with the job as it is answered, before `on_answer` (not with a `future`)
    settle: Callable[[Job], None] | None = field(default=None, repr=False)
    #: answered, failed, timed out or abandoned: nothing more goes to it
    done: bool = field(default=False, init=False, repr=False)

    def answer(self, outcome: Response | BaseException) -> None:
        """Deliver the answer (a `Response`) or the error, unless the job has one already.
        An error raised by `on_answer` is logged, never passed to the caller: the pool
        answering a batch goes on to the next request."""
        if self.done:
            return
        self.done = True
        # an answered job keeps no callback: its caller (an exchange holding the job) and it
        # would otherwise form a reference cycle per request, left to the garbage collector
        on_answer, self.on_answer, self.on_chunk = self.on_answer, None, None
        future = self.future
        if future is not None:
            if not future.done():  # a caller that stopped waiting cancelled it
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return
        if self.settle is not None:
            self.settle(self)
        if on_answer is not None:
            try:
                on_answer(outcome)
            except Exception:
                log.exception("answering request %s failed", self.request.request_id)


class ClientGone(Exception):
    """The client disconnected; nobody is waiting for this answer."""


def new_request_id(incoming: str | None) -> str:
    """The client's `x-request-id` when it is sane, else a fresh random version-4 UUID.

    Request ids need to be unique, not secret: `random` makes one several times faster than
    `uuid.uuid4()` (which reads the OS entropy pool), and this runs once per request.
    """
    if incoming and _CLIENT_ID.fullmatch(incoming):
        return incoming
    h = f"{getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
