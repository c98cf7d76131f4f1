"""Stateful sessions: TorchServe's sequence batching (`sequenceBatching`) and its continuous
batching of sequences (`continuousBatching`). Runs on the daemon's event loop only; nothing
here blocks.

A model whose model-config.yaml sets `sequenceBatching: true` (and `sequenceMaxIdleMSec` > 0,
as TorchServe requires) has a `Sessions`. A request names its session in the
`ts_request_sequence_id` header (gRPC `StreamPredictions2`: `sequence_id`); one without it
opens a new session, whose id the server makes (`ts-seq-<uuid>`) and sends the handler with
`ts_request_sequence_start: true`; every answer carries the id back in that header. A new id
the client chose opens a session too (TorchServe's sequence-batching example does that).

- Order: a session's requests go to one worker (the first to take one), one at a time, in
  arrival order (`ModelQueue.take`). Each worker serves at most `ceil(maxNumSequence /
  minWorkers)` sessions; the model at most `maxNumSequence` (at least `batchSize *
  maxWorkers`, as TorchServe counts it), and a request that would open one more is refused.
  A session holds at most `maxSequenceJobQueueSize` requests waiting besides the one running.
- End: an answer carrying `ts_request_sequence_end` (the handler sets it; ids joined by `;`)
  closes those sessions: requests of theirs still waiting are answered with the refusal
  (TorchServe leaves them unanswered), and so is a later request naming one.
- Expiry: a session with nothing waiting or running expires `sequenceMaxIdleMSec` after its
  last activity, or once `sequenceTimeoutMSec` (0: never) have passed since it opened. A
  request arriving past either is refused; requests it queued before are still served (as
  TorchServe polls a group's queue before it drops the group), and it closes when they are.
  One sweep per model finds expired sessions (`expire`), armed only while sessions exist.
- Continuous batching: an answer whose headers say `ts_stream_next: true` is an
  intermediate one: it is streamed to the client, the request stays on its worker and is sent
  again with the worker's next batch (its id and headers, no body: "cached in the backend"),
  and the session's next request may join that batch (so a handler can cancel a stream).
  The pool keeps those requests (`WorkerPool._carry`); `continued` forms their next batch.

The refusals are TorchServe's 503 message (gRPC: INTERNAL, as TorchServe answers it) with
the reason appended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from random import getrandbits
from typing import TYPE_CHECKING

from tsctl.errors import BadRequest, PredictionFailed, RequestTooLarge, ServiceUnavailable
from tsctl.ipc.codec import request_entry
from tsctl.server.request import InferenceRequest, Job, Response

if TYPE_CHECKING:
    from tsctl.server.batching import ModelQueue

log = logging.getLogger("tsctl.server")

#: TorchServe's header names (its `ts_header_key_sequence_*` defaults)
SEQUENCE_ID = "ts_request_sequence_id"
SEQUENCE_START = "ts_request_sequence_start"
SEQUENCE_END = "ts_request_sequence_end"
STREAM_NEXT = "ts_stream_next"
#: the ids the server makes start with this; one it does not know is closed or expired
GENERATED = "ts-seq-"
#: closed sessions' ids remembered (the oldest is forgotten past this)
MAX_ENDED = 10000
#: the longest session id a client may send
MAX_ID_LENGTH = 256


class SequenceRefused(ServiceUnavailable):
    """A request for a session that is closed, expired, full, or over the model's cap."""

    grpc_code = "INTERNAL"  # TorchServe's StreamPredictions2 answers it INTERNAL


class SequenceIdRequired(BadRequest):
    """A StreamPredictions2 request to a stateful model with no `sequence_id` that does not
    ask for a new session."""

    grpc_code = "INTERNAL"  # as TorchServe answers it


@dataclass(frozen=True)
class SessionSettings:
    """A model's session settings, in seconds where TorchServe's are milliseconds."""

    max_idle: float
    timeout: float  # 0: no total time
    max_queue: int  # requests waiting per session, besides the one running
    max_num: int  # sessions open at once, for the model
    per_worker: int  # sessions one worker serves at once
    continuous: bool

    @classmethod
    def of(
        cls,
        idle_ms: int,
        timeout_ms: int,
        max_queue: int,
        max_num: int,
        continuous: bool,
        batch_size: int,
        min_workers: int,
        max_workers: int,
    ) -> SessionSettings:
        """From model-config.yaml's values, counted as TorchServe counts them."""
        total = max(max_num, batch_size * max_workers)
        return cls(
            idle_ms / 1000,
            timeout_ms / 1000,
            max_queue,
            total,
            max(1, math.ceil(total / max(1, min_workers))),
            continuous,
        )


@dataclass(eq=False)
class Session:
    id: str
    opened: float
    last: float  # its last arrival or answer
    pending: int = 0  # requests queued and not answered yet
    #: why it is past its time, if it is: it closes once its pending requests are answered
    expiring: str = ""
    #: no request of it was queued yet (`unopen` may take it back)
    fresh: bool = True


class Sessions:
    """One model version's sessions (see the module docstring)."""

    def __init__(
        self,
        model: str,
        settings: SessionSettings,
        queue: ModelQueue,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self._open: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it closed
        self._timer: asyncio.TimerHandle | None = None
        #: jobs a continuous batch streams on (sent again with their worker's next batch):
        #: their steps are not new requests (served, queue latency: `WorkerPool`)
        self.carried: set[Job] = set()
        #: the bytes each job streamed so far, all its steps' chunks together
        self.streamed: dict[Job, int] = {}
        queue.sessions = self
        queue.sequence_cap = settings.per_worker

    def __len__(self) -> int:
        return len(self._open)

    def get(self, sequence: str) -> Session | None:
        return self._open.get(sequence)

    def refusal(self, why: str) -> SequenceRefused:
        return SequenceRefused(
            f'Model "{self.model}" has no worker to serve inference request. Please use scale '
            "workers API to add workers. If this is a sequence inference, please check if it "
            f"is closed, or expired; or exceeds maxSequenceJobQueueSize ({why})"
        )

    def admit(
        self, request: InferenceRequest, sequence: str | None
    ) -> tuple[InferenceRequest, str]:
        """The session `request` belongs to (its `sequence`, else its header's, else a new
        one), and the request as the handler gets it (with the id and start headers); raises
        `SequenceRefused` when the session is closed, expired, full, or one too many."""
        headers = list(request.headers)
        named = sequence or _header(headers, SEQUENCE_ID)
        now = self.clock()
        if not named:
            sequence = _new_id()
            headers += [(SEQUENCE_ID, sequence), (SEQUENCE_START, "true")]
            session = None
        else:
            sequence = named
            if len(sequence) > MAX_ID_LENGTH or not sequence.isprintable():
                raise BadRequest(
                    f"{SEQUENCE_ID} must be printable text of at most {MAX_ID_LENGTH} characters"
                )
            if _header(headers, SEQUENCE_ID) != sequence:
                headers = [(k, v) for k, v in headers if k.lower() != SEQUENCE_ID]
                headers.append((SEQUENCE_ID, sequence))
            session = self._open.get(sequence)
            if session is not None:
                why = self._overdue(session, now)
                if why:
                    session.expiring = why
                    if not session.pending:
                        self.close(sequence, why)
                    raise self.refusal(f"sequence {sequence} {why}")
            elif sequence in self._ended:
                raise self.refusal(f"sequence {sequence} {self._ended[sequence]}")
            elif sequence.startswith(GENERATED):
                raise self.refusal(f"sequence {sequence} is unknown: closed or expired")
        settings = self.settings
        if session is None:
            if len(self._open) >= settings.max_num:
                raise self.refusal(
                    f"{settings.max_num} sequences are open, the most this model takes "
                    "(maxNumSequence)"
                )
            session = self._open[sequence] = Session(sequence, now, now)
            self._arm()
        elif session.pending > settings.max_queue:
            raise self.refusal(
                f"sequence {sequence} has {session.pending} requests waiting or running "
                f"(maxSequenceJobQueueSize {settings.max_queue})"
            )
        session.last = now
        return dataclasses.replace(request, headers=headers), sequence

    def queued(self, job: Job) -> None:
        """`job` of an admitted session is in the queue."""
        session = self._open.get(job.sequence or "")
        if session is not None:
            session.pending += 1
            session.fresh = False

    def unopen(self, sequence: str) -> None:
        """The request `admit` opened `sequence` for was refused before it was queued: the
        session goes as if it never opened (its id may be used again)."""
        session = self._open.get(sequence)
        if session is not None and session.fresh:
            del self._open[sequence]

    def settled(self, job: Job) -> None:
        """`job` has its answer (the queue's `settle`)."""
        if self.carried or self.streamed:
            self.carried.discard(job)
            self.streamed.pop(job, None)
        session = self._open.get(job.sequence or "")
        if session is not None:
            session.pending = max(0, session.pending - 1)
            session.last = self.clock()
            if session.expiring and not session.pending:
                self.close(session.id, session.expiring)

    def stream(self, job: Job, size: int, limit: int) -> bool:
        """Count `size` more bytes streamed to `job`; past `limit` (max_response_size, all
        its steps' chunks together) the job is answered with an error and False returned."""
        total = self.streamed[job] = self.streamed.get(job, 0) + size
        if total <= limit:
            return True
        job.answer(
            PredictionFailed(
                f"the streamed response of over {total} bytes exceeds max_response_size ({limit})"
            )
        )
        return False

    def answered(self, job: Job, response: Response, limit: int) -> Response | None:
        """What to answer `job` with (`response` with the session's id header), or None when
        it is an intermediate answer of a continuous batch: streamed to the client (when it
        takes chunks), the job stays on its worker (the pool sends it again) unless its
        chunks add up to more than `limit` bytes, which ends it with an error."""
        sequence = job.sequence or ""
        headers = response.headers
        end = stream = None
        named = False
        for name, value in headers:
            key = name.lower()
            if key == SEQUENCE_END:
                end = value
            elif key == STREAM_NEXT:
                stream = value
            elif key == SEQUENCE_ID:
                named = True
        if not named:
            response = dataclasses.replace(response, headers=(*headers, (SEQUENCE_ID, sequence)))
        if end:
            for ended in end.split(";"):
                if ended.strip():
                    self.close(ended.strip(), "was ended by the model's handler")
        if stream == "true" and self.settings.continuous and not job.done:
            if not self.stream(job, len(response.body), limit):
                return None
            if job.on_chunk is not None:
                job.on_chunk(response)
            if job.done:  # its client's end refused it (a full gRPC stream)
                return None
            self.carried.add(job)
            self.queue.sequence_free(job)  # the session's next request may join
            if job.request.parts:  # sent again without its body, as TorchServe does
                job.request = dataclasses.replace(job.request, parts=())
                job.entry = request_entry(job.request)
            return None
        return response

    def close(self, sequence: str, why: str) -> None:
        """Close `sequence`: its waiting requests are answered with the refusal, and so is a
        later request naming it."""
        if self._open.pop(sequence, None) is None:
            return
        self._ended[sequence] = why
        log.info("sequence %s of model %s closed: it %s", sequence, self.model, why)
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        self.queue.drop_sequence(sequence, self.refusal(f"sequence {sequence} {why}"))

    def expire(self, now: float) -> int:
        """Close the sessions past their idle or total time with nothing pending; mark those
        with requests pending to close once answered. How many closed."""
        closed = 0
        for session in list(self._open.values()):
            why = self._overdue(session, now)
            if not why or session.expiring:
                continue
            session.expiring = why
            if session.pending:
                log.info(
                    "sequence %s of model %s %s; it closes once its %d pending requests are "
                    "answered",
                    session.id, self.model, why, session.pending,
                )  # fmt: skip
            else:
                self.close(session.id, why)
                closed += 1
        return closed

    def _overdue(self, session: Session, now: float) -> str:
        """Why `session` is past its time at `now`, or ""."""
        settings = self.settings
        if settings.timeout and now - session.opened >= settings.timeout:
            return f"expired: open for more than sequenceTimeoutMSec ({_ms(settings.timeout)})"
        if not session.pending and now - session.last >= settings.max_idle:
            return f"expired: idle for more than sequenceMaxIdleMSec ({_ms(settings.max_idle)})"
        return ""

    def _arm(self) -> None:
        """The sweep's one timer, while sessions are open: at a tenth of the shortest time
        (between 50 ms and 1 s), so a session closes that late at most."""
        if self._timer is not None:
            return
        settings = self.settings
        shortest = min(settings.max_idle, settings.timeout or settings.max_idle)
        period = min(1.0, max(0.05, shortest / 10))
        self._timer = asyncio.get_running_loop().call_later(period, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        self.expire(self.clock())
        if self._open:
            self._arm()

    def stop(self) -> None:
        """The model version is going: no more sweeps."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def continued(
    queue: ModelQueue, carried: list[Job], batch_size: int, worker: Hashable
) -> list[Job]:
    """The next batch of a worker with requests streaming (continuous batching): those, and
    the jobs it may take that are waiting now (no waiting for more), up to twice the batch
    size in all (TorchServe's bound)."""
    jobs = [job for job in carried if not job.done]
    while len(jobs) < 2 * batch_size and (job := queue.take(worker)) is not None:
        jobs.append(job)
    return jobs


def _header(headers: list[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


def _new_id() -> str:
    h = f"{getrandbits(128):032x}"
    return (
        f"{GENERATED}{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
    )


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)} ms"


#: a StreamPredictions2 request's intermediate answers its client has not read yet, at most
MAX_HELD_CHUNKS = 64


class HeldChunks:
    """A StreamPredictions2 request's intermediate answers until its client reads them (a
    continuous stream's may be many): at most `MAX_HELD_CHUNKS`; one more ends the request
    (its `jobs`) with an error, so a client that does not read holds no more. Event-loop only."""

    def __init__(self) -> None:
        #: the bodies, then None once the request is answered (one place kept for it)
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_HELD_CHUNKS + 1)
        self.jobs: list[Job] = []

    def put(self, response: Response) -> None:
        if self.chunks.qsize() < MAX_HELD_CHUNKS:
            self.chunks.put_nowait(bytes(response.body))
            return
        error = RequestTooLarge(
            f"the client has not read the last {MAX_HELD_CHUNKS} intermediate answers of its "
            "stream: the request is ended"
        )
        for job in self.jobs:
            job.answer(error)

    def end(self, _: object) -> None:
        self.chunks.put_nowait(None)
