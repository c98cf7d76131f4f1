"""`ts.handler_utils.micro_batching.MicroBatching`: run a batch as a pipeline of micro-batches.

A handler replaces its `handle` with `MicroBatching(self)`. Each batch is cut into slices of
`micro_batch_size` requests; the handler's `preprocess`, `inference` and `postprocess` each
run on their own threads (`parallelism`, e.g. `{"preprocess": 2, "inference": 1,
"postprocess": 2}`; 1 each by default), joined by queues, so one slice is preprocessed while
the one before it is in the model. Answers come back in request order. As in TorchServe's
example handler, the settings usually come from model-config.yaml::

    micro_batching:
      micro_batch_size: 4
      parallelism: {preprocess: 2, inference: 1, postprocess: 2}

Unlike TorchServe's, an exception in any step fails the batch (the handler's error reaches
the client) instead of leaving the batch waiting forever. Threads are daemons: a worker that
exits does not wait for them. One batch runs at a time (the worker's loop guarantees it).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass
from typing import Any

HANDLER_METHODS = ["preprocess", "inference", "postprocess"]
#: how often an idle step thread checks whether it should stop, in seconds
_POLL = 0.1


@dataclass
class WorkerThread:
    event: threading.Event
    thread: threading.Thread


@dataclass(frozen=True)
class _Failed:
    """A micro-batch whose step raised: it skips the remaining steps."""

    error: BaseException


def execute_call(
    in_queue: queue.Queue[Any],
    out_queue: queue.Queue[Any],
    failed_queue: queue.Queue[Any],
    handle: Callable[[Any], Any],
    thread_local_data: threading.local,
    event: threading.Event,
) -> None:
    """One step thread: take (index, data), run `handle` on it, pass the result on."""
    while not event.is_set():
        try:
            idx, in_data = in_queue.get(timeout=_POLL)
        except queue.Empty:
            continue
        thread_local_data.micro_batch_idx = idx
        try:
            out_queue.put((idx, handle(in_data)))
        except BaseException as exc:  # reported to the caller of handle(), not swallowed
            failed_queue.put((idx, _Failed(exc)))


class MicroBatching:
    """A callable `handle(data, context)` that pipelines `parent_handler`'s steps."""

    def __init__(
        self,
        parent_handler: Any,
        micro_batch_size: int = 1,
        parallelism: dict[str, int] | None = None,
    ) -> None:
        self.handler = parent_handler
        self.micro_batch_size = micro_batch_size
        self._parallelism: dict[str, int] = dict(parallelism or {})
        self.thread_groups: dict[str, list[WorkerThread]] = {m: [] for m in HANDLER_METHODS}
        self.thread_local_data = threading.local()
        # each step's "out" queue is the next step's "in" queue
        self.queues: dict[str, queue.Queue[Any]] = {}
        self.queues["preprocess_in"] = queue.Queue()
        for step, following in itertools.pairwise(HANDLER_METHODS):
            self.queues[f"{step}_out"] = self.queues[f"{following}_in"] = queue.Queue()
        self.queues["postprocess_out"] = queue.Queue()
        self._validate(self._parallelism)
        self._update_threads()

    def __del__(self) -> None:
        self.shutdown()

    @property
    def parallelism(self) -> dict[str, int]:
        return copy(self._parallelism)

    @parallelism.setter
    def parallelism(self, parallelism: dict[str, int]) -> None:
        """Change the number of threads of some steps (the others keep theirs)."""
        self._validate(parallelism)
        self._parallelism.update(parallelism)
        self._update_threads()

    @staticmethod
    def _validate(parallelism: dict[str, int]) -> None:
        for step, count in parallelism.items():
            if step not in HANDLER_METHODS:
                raise ValueError(
                    f"micro-batching parallelism names {step!r}: expected one of "
                    f"{', '.join(HANDLER_METHODS)}"
                )
            if not isinstance(count, int) or count < 1:
                raise ValueError(
                    f"micro-batching parallelism of {step} must be a positive integer, "
                    f"not {count!r}"
                )

    def shutdown(self) -> None:
        """Stop every step thread."""
        for group in getattr(self, "thread_groups", {}).values():
            for worker in group:
                worker.event.set()
            for worker in group:
                if worker.thread is not threading.current_thread():
                    worker.thread.join()
            group.clear()

    def _update_threads(self) -> None:
        for step in HANDLER_METHODS:
            target = self._parallelism.get(step, 1)
            group = self.thread_groups[step]
            while len(group) < target:
                event = threading.Event()
                thread = threading.Thread(
                    target=execute_call,
                    args=(
                        self.queues[f"{step}_in"],
                        self.queues[f"{step}_out"],
                        self.queues["postprocess_out"],
                        getattr(self.handler, step),
                        self.thread_local_data,
                        event,
                    ),
                    name=f"micro-batching-{step}-{len(group)}",
                    daemon=True,
                )
                thread.start()
                group.append(WorkerThread(event, thread))
            while len(group) > target:
                worker = group.pop()
                worker.event.set()
                worker.thread.join()

    def handle(self, data: list[Any]) -> list[Any]:
        """Run `data` through the pipeline in slices; the answers, in request order."""
        size = max(1, int(self.micro_batch_size))
        count = 0
        for idx, start in enumerate(range(0, len(data), size)):
            self.queues["preprocess_in"].put_nowait((idx, data[start : start + size]))
            count += 1
        finished = [self.queues["postprocess_out"].get() for _ in range(count)]
        finished.sort(key=lambda item: item[0])
        for _, output in finished:
            if isinstance(output, _Failed):
                raise output.error
        return [answer for _, output in finished for answer in output]

    def get_micro_batch_idx(self) -> int | None:
        """The index of the micro-batch the calling step thread is working on."""
        return getattr(self.thread_local_data, "micro_batch_idx", None)

    def __call__(self, data: list[Any], context: Any) -> Any:
        """The handler's `handle`: describe and explain requests as BaseHandler does, every
        other batch through the pipeline; records HandlerTime."""
        started = time.time()
        handler = self.handler
        handler.context = context
        if handler._profiler_enabled():
            output, _ = handler._infer_with_profiler(data=data)
        elif handler._is_describe():
            output = [handler.describe_handle()]
        elif handler._is_explain():
            output = handler.explain_handle(handler.preprocess(data), data)
        else:
            output = self.handle(data)
        if context.metrics is not None:
            context.metrics.add_time(
                "HandlerTime", round((time.time() - started) * 1000, 2), None, "ms"
            )
        return output
