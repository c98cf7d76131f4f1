"""`ts.handler_utils.micro_batching.MicroBatching`: a handler's steps as a pipeline over slices.

A handler replaces its `handle` with `MicroBatching(self)`. Each batch is cut into slices of
`micro_batch_size` requests that flow through three stages, the handler's `preprocess`,
`inference` and `postprocess`, so one slice can be preprocessed while the one before it is in
the model. `parallelism` says how many threads each stage has (1 by default), e.g.
`{"preprocess": 2, "inference": 1, "postprocess": 2}`. Answers come back in request order.
TorchServe's example handler reads the settings from model-config.yaml::

    micro_batching:
      micro_batch_size: 4
      parallelism: {preprocess: 2, inference: 1, postprocess: 2}

How it works: each stage is a few daemon threads blocked on the stage's own `queue.Queue`. A
work item is one slice of one `handle` call; a thread runs its stage's step on it and puts the
result on the next stage's queue, and the last stage files it with its call. A call counts
its slices still in flight and keeps the first error any step raised: slices of a failed call
skip the steps they have not reached yet, and the call raises that error once every slice is
accounted for, so it never hangs and nothing of it lingers into the next call. A thread stops
when it takes a stop marker from its queue; no thread polls. Calls may overlap (each keeps its
own slices), though the worker runs one batch at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import Queue
from typing import Any

#: the handler methods the stages call, in pipeline order
_STEPS = ("preprocess", "inference", "postprocess")
#: put on a stage's queue to end one of its threads (whichever takes it)
_STOP = object()


class _Call:
    """One `handle` call in flight: each slice's answers, the first error, and a latch that
    opens when every slice has left the pipeline (answered, failed, or skipped)."""

    def __init__(self, slices: int) -> None:
        self.answers: list[Any] = [None] * slices
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._in_flight = slices
        self._lock = threading.Lock()
        if slices == 0:
            self.done.set()

    def finish(self, number: int, answers: Any = None, error: BaseException | None = None) -> None:
        """Slice `number` left the pipeline, with its answers or with the error that ended it."""
        with self._lock:
            if error is None:
                self.answers[number] = answers
            elif self.error is None:
                self.error = error
            self._in_flight -= 1
            if self._in_flight == 0:
                self.done.set()


@dataclass
class _Item:
    """One slice of a call on its way through the stages: what the last step produced."""

    call: _Call
    number: int
    value: Any


class _Stage:
    """One step of the pipeline: daemon threads that take items from `queue`, apply `step` to
    each and pass the result to `forward` (the next stage's queue, or the call itself)."""

    def __init__(
        self,
        name: str,
        step: Callable[[Any], Any],
        forward: Callable[[_Item], None],
        position: threading.local,
    ) -> None:
        self.name = name
        self.queue: Queue[Any] = Queue()
        self._step = step
        self._forward = forward
        self._position = position
        self._threads: set[threading.Thread] = set()
        self._exited = threading.Condition()
        self._started = 0

    def resize(self, count: int) -> None:
        """Start or stop threads until `count` run. Stopping waits for the threads to take
        their stop markers, i.e. after the items queued before them."""
        with self._exited:
            surplus = len(self._threads) - count
            while len(self._threads) < count:
                thread = threading.Thread(
                    target=self._serve, name=f"micro-batching-{self.name}-{self._started}"
                )
                thread.daemon = True
                self._started += 1
                self._threads.add(thread)
                thread.start()
        for _ in range(surplus):
            self.queue.put(_STOP)
        if surplus > 0 and threading.current_thread() not in self._threads:
            with self._exited:
                self._exited.wait_for(lambda: len(self._threads) <= count)

    def _serve(self) -> None:
        try:
            while (item := self.queue.get()) is not _STOP:
                self._take(item)
        finally:
            with self._exited:
                self._threads.discard(threading.current_thread())
                self._exited.notify_all()

    def _take(self, item: _Item) -> None:
        call = item.call
        if call.error is not None:  # an earlier step of this call failed: skip the rest
            call.finish(item.number, error=call.error)
            return
        self._position.slice_number = item.number
        try:
            value = self._step(item.value)
        except BaseException as exc:  # the caller of handle() raises it; the thread lives on
            call.finish(item.number, error=exc)
            return
        self._forward(_Item(call, item.number, value))


def _check_count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"micro-batching {what} must be a positive integer, not {value!r}")
    return value


class MicroBatching:
    """`handle(data, context)` for `parent_handler`, with its steps run as a pipeline."""

    def __init__(
        self,
        parent_handler: Any,
        micro_batch_size: int = 1,
        parallelism: dict[str, int] | None = None,
    ) -> None:
        self.handler = parent_handler
        #: what this wraps, for `tsctl.worker.envelope.unwrap_handler` (the describe API)
        self.__wrapped__ = parent_handler
        self.micro_batch_size = micro_batch_size
        self._position = threading.local()
        self._threads_per_step = dict.fromkeys(_STEPS, 0)
        self._stages: dict[str, _Stage] = {}
        forward: Callable[[_Item], None] = self._file_answers
        for name in reversed(_STEPS):  # each stage hands its results to the one after it
            stage = _Stage(name, self._step_of(name), forward, self._position)
            self._stages[name] = stage
            forward = stage.queue.put
        self.parallelism = {**dict.fromkeys(_STEPS, 1), **(parallelism or {})}

    # -- settings TorchServe handlers touch -------------------------------------------------

    @property
    def micro_batch_size(self) -> int:
        """How many requests one slice holds (the last slice of a batch may hold fewer)."""
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, size: int) -> None:
        self._micro_batch_size = _check_count("micro_batch_size", size)

    @property
    def parallelism(self) -> dict[str, int]:
        """Threads per step: `{"preprocess": n, "inference": n, "postprocess": n}` (a copy)."""
        return dict(self._threads_per_step)

    @parallelism.setter
    def parallelism(self, parallelism: dict[str, int]) -> None:
        """Change the thread count of the steps named; the others keep theirs."""
        for name, count in parallelism.items():
            if name not in self._stages:
                raise ValueError(
                    f"micro-batching parallelism names {name!r}: expected one of "
                    f"{', '.join(_STEPS)}"
                )
            _check_count(f"parallelism of {name}", count)
        for name in _STEPS:
            if name in parallelism:
                self._stages[name].resize(parallelism[name])
                self._threads_per_step[name] = parallelism[name]

    def shutdown(self) -> None:
        """Stop every thread, stage by stage, after the slices already queued. Setting
        `parallelism` again starts threads anew."""
        for name in _STEPS:
            self._stages[name].resize(0)
            self._threads_per_step[name] = 0

    def get_micro_batch_idx(self) -> int | None:
        """Which slice of the batch the calling step is working on (0, 1, ...); None outside
        the pipeline's threads. Streaming handlers use it to tell their slices apart."""
        return getattr(self._position, "slice_number", None)

    # -- running batches --------------------------------------------------------------------

    def handle(self, data: list[Any]) -> list[Any]:
        """Run `data` through the pipeline in slices; the answers in request order, or the
        first error a step raised."""
        stopped = [name for name, count in self._threads_per_step.items() if count == 0]
        if stopped:
            raise RuntimeError(
                f"micro-batching has no threads for {', '.join(stopped)} (it was shut down)"
            )
        size = self._micro_batch_size
        slices = [data[start : start + size] for start in range(0, len(data), size)]
        call = _Call(len(slices))
        entry = self._stages[_STEPS[0]].queue
        for number, piece in enumerate(slices):
            entry.put(_Item(call, number, piece))
        call.done.wait()
        if call.error is not None:
            raise call.error
        joined: list[Any] = []
        for number, answers in enumerate(call.answers):
            if isinstance(answers, (str, bytes, dict)) or not hasattr(answers, "__iter__"):
                raise TypeError(
                    f"postprocess returned {type(answers).__name__} for micro-batch {number}, "
                    "expected a list with one answer per request"
                )
            joined.extend(answers)
        return joined

    def __call__(self, data: list[Any], context: Any) -> Any:
        """The handler's `handle`: a prediction batch goes through the pipeline (HandlerTime
        is recorded); describe, explain and profiled batches take BaseHandler's own route."""
        handler = self.handler
        handler.context = context
        if not _is_plain_prediction(handler):
            from ts.torch_handler.base_handler import BaseHandler

            return BaseHandler.handle(handler, data, context)
        started = time.perf_counter()
        answers = self.handle(data)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            elapsed_ms = (time.perf_counter() - started) * 1000
            metrics.add_time("HandlerTime", round(elapsed_ms, 2), None, "ms")
        return answers

    def _step_of(self, name: str) -> Callable[[Any], Any]:
        """Calls the handler's method `name`, looked up at each call (a handler may replace
        its methods after wrapping itself)."""

        def step(value: Any) -> Any:
            return getattr(self.handler, name)(value)

        return step

    @staticmethod
    def _file_answers(item: _Item) -> None:
        item.call.finish(item.number, answers=item.value)


def _is_plain_prediction(handler: Any) -> bool:
    """Neither profiled, nor a describe request, nor an explanation request (BaseHandler's
    tests; a handler without them only ever predicts)."""
    for test in ("_profiler_enabled", "_is_describe", "_is_explain"):
        check = getattr(handler, test, None)
        if check is not None and check():
            return False
    return True
