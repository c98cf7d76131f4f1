"""Priority batching for tsctl: requests say `X-Priority: high` or `low` (gRPC: `x-priority`
metadata). Each batch takes the waiting high-priority jobs first, oldest first, then low ones,
at most `max_low_per_batch` of them; like tsctl's default it waits up to the model's
`maxBatchDelay` for a fuller batch, and no longer than clients are likely to send.

model-config.yaml:

    batchingStrategy: priority
    batchingOptions: {max_low_per_batch: 2, default_class: low}
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from tsctl.plugins import BatchingStrategy

if TYPE_CHECKING:
    from tsctl.server.batching import ModelQueue
    from tsctl.server.request import Job

CLASSES = ("high", "low")
OPTIONS = ("max_low_per_batch", "default_class")


class PriorityBatching(BatchingStrategy):
    name = "priority"

    def __init__(self, max_low_per_batch: int | None = None, default_class: str = "low") -> None:
        self.max_low = max_low_per_batch  # None: only the batch size limits low jobs
        self.default_class = default_class

    def configure(self, options: Mapping[str, Any]) -> PriorityBatching:
        unknown = sorted(str(name) for name in options if name not in OPTIONS)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
        cap = options.get("max_low_per_batch")
        if cap is not None and (type(cap) is not int or cap < 1):
            raise ValueError(f"max_low_per_batch must be a whole number of at least 1, not {cap!r}")
        default = options.get("default_class", "low")
        if default not in CLASSES:
            raise ValueError(f"default_class must be 'high' or 'low', not {default!r}")
        return PriorityBatching(cap, default)

    def is_high(self, job: Job) -> bool:
        """Whether a job is high priority: its X-Priority header (any case: REST keeps the
        client's spelling, gRPC metadata is lower-case), else `default_class`."""
        for name, value in job.request.headers:
            if name.lower() == "x-priority" and value.strip().lower() in CLASSES:
                return value.strip().lower() == "high"
        return self.default_class == "high"

    def pick(self, waiting: list[Job], room: int, lows: int) -> list[Job]:
        """Up to `room` of the `waiting` jobs: the high ones (oldest first), then low ones
        while the batch, which has `lows` low jobs already, stays within the cap."""
        high = [job for job in waiting if self.is_high(job)][:room]
        cap = room if self.max_low is None else max(0, self.max_low - lows)
        low = [job for job in waiting if not self.is_high(job)][: min(cap, room - len(high))]
        return high + low

    def fill(self, queue: ModelQueue, batch: list[Job], batch_size: int, worker: Hashable) -> None:
        lows = sum(not self.is_high(job) for job in batch)
        for job in self.pick(queue.waiting(worker), batch_size - len(batch), lows):
            if queue.take_job(job, worker):
                batch.append(job)

    async def next_batch(
        self, queue: ModelQueue, batch_size: int, max_delay_ms: float, worker: Hashable
    ) -> list[Job]:
        batch: list[Job] = []
        try:
            self.fill(queue, batch, batch_size, worker)
            while not batch:  # idle: until a job arrives
                await queue.wait_for_job()
                self.fill(queue, batch, batch_size, worker)
            deadline = queue.clock() + max_delay_ms / 1000
            while len(batch) < batch_size:  # as tsctl's default: up to maxBatchDelay, and
                now = queue.clock()  # no longer than clients are likely to send
                if now >= deadline or not queue.likely_arrivals(now):
                    break
                await queue.wait_for_more(deadline - now)
                self.fill(queue, batch, batch_size, worker)
        except asyncio.CancelledError:
            queue.requeue_front(batch)  # nothing taken is lost when the worker goes away
            raise
        return batch

    def ready_batch(self, queue: ModelQueue, batch_size: int, worker: Hashable) -> list[Job]:
        """A full batch by the same rules, if one is waiting (sent as a result arrives)."""
        if len(queue) < batch_size:
            return []
        chosen = self.pick(queue.waiting(worker), batch_size, 0)
        if len(chosen) < batch_size:
            return []
        return [job for job in chosen if queue.take_job(job, worker)]
