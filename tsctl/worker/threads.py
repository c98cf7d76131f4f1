"""torch's intra-op threads in a worker: applied on the main thread, and tuned while it serves.

`Threads` applies the count the frontend chose (`WorkerSpec.threads`) with
`torch.set_num_threads` on the main thread, where handlers run (an OpenMP setting is per
calling thread), once torch has been imported completely.

`ThreadTuner` runs when that count is tsctl's default (the machine's cores shared among the
workers, `worker_threads` 0): more threads than a model can use cost CPU and buy nothing.
A small model spends a batch in Python and in operators too small to split, and torch's
thread team then only adds its fork, join and idle spinning: measured on the benchmark MLP,
two threads cost 2.2 times the CPU of one per forward and were slower. So, after `WARMUP`
batches, the worker serves batches alternately with its count and with half of it, `SAMPLES`
of each, and compares the handler's median time per request: the half is kept unless it is
more than `SLOWER` slower, and halving goes on down to one thread; the first half that loses
ends the tuning at the count before it (after only `FIRST` batches of each when it is
`CLEARLY_SLOWER`). A model that gains from its threads (convolutions,
large matrices) keeps them; one that does not gives their cores back to the daemon and the
other workers. The choice is logged in model_log.log. Only a worker that runs batches one at
a time tunes (not `asyncCommunication`, not torchrun's ranks).
"""

from __future__ import annotations

import logging
import statistics
import sys
import threading

log = logging.getLogger("tsctl.worker")

#: batches served before measuring: TorchScript's profiling runs, caches, allocator warm-up
WARMUP = 8
#: batches measured with each of the two counts compared
SAMPLES = 12
#: fewer threads are kept unless their median time per request is this much longer
SLOWER = 1.1
#: a count this much slower loses after `FIRST` batches of each: a model that needs its
#: threads (say a convnet, 1.8 times slower on half of them) pays few slow trial batches
CLEARLY_SLOWER = 1.5
FIRST = 3


def _torch_ready(preloading: threading.Event | None) -> bool:
    """torch is imported, and completely (not still being imported by the preload thread)."""
    return "torch" in sys.modules and (preloading is None or preloading.is_set())


def _set(count: int) -> None:
    import torch

    torch.set_num_threads(count)


class Threads:
    """Applies torch's intra-op thread count on the main thread, once torch is imported."""

    def __init__(self, count: int, preloading: threading.Event | None) -> None:
        self.pending = count > 0
        self.count = count
        self.preloading = preloading

    def apply(self) -> None:
        if not self.pending or not _torch_ready(self.preloading):
            return  # still importing: applied before a later batch
        _set(self.count)
        self.pending = False


class ThreadTuner:
    """Halves a worker's torch threads while that does not slow its batches (see the module).
    `before` sets the count for the next batch; `after` records how long it took."""

    def __init__(self, threads: Threads) -> None:
        self.threads = threads
        self.kept = threads.count  # the count that won so far
        self.trial = max(1, self.kept // 2)
        self.done = self.kept <= 1
        self._seen = 0
        self._running = self.kept  # the count the batch in progress runs with
        self._times: dict[int, list[float]] = {self.kept: [], self.trial: []}
        self._compared: list[str] = []

    def before(self) -> None:
        if self.done or self._seen < WARMUP or not _torch_ready(self.threads.preloading):
            self._running = self.kept
            return
        # alternate, so that whatever else loads the machine meanwhile weighs on both alike
        wanted = self.trial if self._seen % 2 else self.kept
        if wanted != self._running:
            _set(wanted)
        self._running = wanted

    def after(self, handler_ms: float, requests: int) -> None:
        """The batch `before` prepared took the handler `handler_ms` for `requests`."""
        if self.done:
            return
        self._seen += 1
        if self._seen <= WARMUP or requests <= 0 or handler_ms <= 0:
            return
        if "torch" not in sys.modules:  # a handler without torch: nothing to tune
            self._finish()
            return
        self._times[self._running].append(handler_ms / requests)
        measured = min(len(self._times[self.kept]), len(self._times[self.trial]))
        if measured < FIRST:
            return
        more = statistics.median(self._times[self.kept])
        fewer = statistics.median(self._times[self.trial])
        if measured < SAMPLES and fewer <= more * CLEARLY_SLOWER:
            return
        self._compared.append(
            f"{self.kept}: {more:.3f} ms, {self.trial}: {fewer:.3f} ms per request"
        )
        if fewer > more * SLOWER:
            self._finish()
            return
        self.kept = self.trial
        if self.kept == 1:
            self._finish()
            return
        self.trial = max(1, self.kept // 2)
        self._times = {self.kept: [], self.trial: []}

    def _finish(self) -> None:
        self.done = True
        if _torch_ready(self.threads.preloading):  # whatever the handler may have set
            _set(self.kept)
        self.threads.count = self.kept
        if self._compared:
            log.info(
                "torch threads tuned to %d (median handler time %s)",
                self.kept,
                "; ".join(self._compared),
            )
