"""Per-request answers for the built-in handlers' batches, safe under `MicroBatching`.

A batch holds several requests, and tsctl's built-in vision and text handlers answer each one
on its own: a request whose input cannot be read is answered 400 alone (its answer is an
`EnvelopeInputError`, which the worker turns into that request's 400) while the others run
through the model; and, tsctl's extension, a request holding several images is answered with
the list of their results. Which request became which model inputs is the batch's `Layout`.

The layout travels with the batch, never on the handler: TorchServe's `MicroBatching` runs
`preprocess` of one slice on one thread while the slice before it is in `inference` or
`postprocess` on others, so state stored on the handler would be another slice's by the time
it is read. `preprocess` returns `Carried(value, layout)`, `inference` hands the layout on
with the model's output, and `postprocess` gives each request its answer (`Layout.place`).

The steps are still written against TorchServe's plain values: `PerRequestSteps` wraps every
step its subclasses define so that the step takes the plain value and its result carries the
layout on. So a TorchServe subclass that overrides one step works unchanged: `postprocess`
gets the model's output, `inference` the input tensor, a `preprocess` that builds its own
batch answers every request with its model row, and one that calls `super().preprocess(data)`
gets the plain tensor (the layout is kept for what it returns).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tsctl.worker.envelope import EnvelopeInputError

T = TypeVar("T")
Step = Callable[..., Any]

#: marks a step function that is already wrapped (a class may reuse another's function)
_WRAPPED = "__tsctl_per_request__"
#: per thread, one slot per `preprocess` call in progress, for a layout produced inside it
_PREPROCESS_CALLS = threading.local()


def request_value(row: Any) -> Any:
    """The main input of a request, as TorchServe's handlers read it: its `data` field, else
    its `body`; None when it has neither. A row that is not a dict is its own input.

    Unlike TorchServe's `row.get("data") or row.get("body")`, a falsy input (an empty
    string, a JSON `0` or `[]`) is still the input."""
    if not isinstance(row, dict):
        return row
    value = row.get("data")
    return row.get("body") if value is None else value


@dataclass(frozen=True)
class Layout:
    """Per request of a batch, in order: how many model inputs it became (1, or more with
    tsctl's several-images extension), or the error that answers it instead."""

    entries: tuple[int | EnvelopeInputError, ...]

    @property
    def inputs(self) -> int:
        """How many model inputs the batch holds."""
        return sum(entry for entry in self.entries if isinstance(entry, int))

    @property
    def plain(self) -> bool:
        """One input per request and no errors: the model's answers are the requests'."""
        return all(isinstance(entry, int) and entry == 1 for entry in self.entries)

    def place(self, answers: Any) -> Any:
        """One answer per request: the answers of the model inputs in order, an error at its
        request's index, and a list for a request with several inputs."""
        if self.plain:
            return answers
        if isinstance(answers, (str, bytes, dict)) or not isinstance(answers, Sequence):
            raise TypeError(
                f"postprocess returned {type(answers).__name__}, expected a list with one "
                f"answer per model input ({self.inputs})"
            )
        if len(answers) != self.inputs:
            raise ValueError(
                f"postprocess returned {len(answers)} answers for the batch's {self.inputs} "
                "model inputs"
            )
        placed: list[Any] = []
        start = 0
        for entry in self.entries:
            if isinstance(entry, EnvelopeInputError):
                placed.append(entry)
                continue
            placed.append(answers[start] if entry == 1 else list(answers[start : start + entry]))
            start += entry
        return placed


def gather(per_request: Sequence[Sequence[T] | EnvelopeInputError]) -> tuple[list[T], Layout]:
    """The model inputs of the requests that have them, in request order, and the layout."""
    inputs: list[T] = []
    entries: list[int | EnvelopeInputError] = []
    for found in per_request:
        if isinstance(found, EnvelopeInputError):
            entries.append(found)
        else:
            inputs.extend(found)
            entries.append(len(found))
    return inputs, Layout(tuple(entries))


@dataclass(frozen=True)
class Carried:
    """A step's plain value (the model's input, or its output) with its batch's layout."""

    value: Any
    layout: Layout


def _open_calls() -> list[Layout | None]:
    """This thread's stack of `preprocess` calls in progress."""
    calls: list[Layout | None] | None = getattr(_PREPROCESS_CALLS, "slots", None)
    if calls is None:
        calls = _PREPROCESS_CALLS.slots = []
    return calls


def _producing(step: Step) -> Step:
    """Wrap a `preprocess`: the outermost call returns a `Carried` when a layout was made,
    a call made through `super()` from another `preprocess` returns the plain value and
    hands its layout to the caller (its slot on this thread's stack)."""

    @functools.wraps(step)
    def preprocess(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        calls = _open_calls()
        calls.append(None)
        try:
            result = step(self, data, *args, **kwargs)
        finally:
            layout = calls.pop()
        if isinstance(result, Carried):
            layout, result = result.layout, result.value
        if calls:
            if layout is not None:
                calls[-1] = layout
            return result
        return result if layout is None else Carried(result, layout)

    return preprocess


def _passing(step: Step) -> Step:
    """Wrap an `inference`: the plain input in, the model's output carried on; a batch whose
    every request failed skips the model."""

    @functools.wraps(step)
    def inference(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(data, Carried):
            return step(self, data, *args, **kwargs)
        if data.layout.inputs == 0:
            return data
        return Carried(step(self, data.value, *args, **kwargs), data.layout)

    return inference


def _placing(step: Step) -> Step:
    """Wrap a `postprocess` (or `explain_handle`): the plain value in, then each answer
    placed at its request."""

    @functools.wraps(step)
    def answering(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(data, Carried):
            return step(self, data, *args, **kwargs)
        answers = step(self, data.value, *args, **kwargs) if data.layout.inputs else []
        return data.layout.place(answers)

    return answering


_WRAPPERS: dict[str, Callable[[Step], Step]] = {
    "preprocess": _producing,
    "inference": _passing,
    "postprocess": _placing,
    "explain_handle": _placing,
}


def _wrapped(step: Step, wrapper: Callable[[Step], Step]) -> Step:
    done = wrapper(step)
    setattr(done, _WRAPPED, True)
    return done


def _placed(step: Step) -> Step:
    return _wrapped(step, _placing)


def _passed(step: Step) -> Step:
    return _wrapped(step, _passing)


class PerRequestSteps:
    """Mix in before `BaseHandler`: the steps of every subclass take plain values (see the
    module's docstring). BaseHandler's own `inference`, `postprocess` and `explain_handle`
    are reached through the wrapped ones here, so they get plain values too."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrapper in _WRAPPERS.items():
            step = cls.__dict__.get(name)
            if inspect.isfunction(step) and not getattr(step, _WRAPPED, False):
                setattr(cls, name, _wrapped(step, wrapper))

    @_passed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """BaseHandler's `inference` of the plain value, the layout carried on."""
        parent: Any = super()
        return parent.inference(data, *args, **kwargs)

    @_placed
    def postprocess(self, data: Any) -> Any:
        """BaseHandler's `postprocess` of the plain value, placed per request."""
        parent: Any = super()
        return parent.postprocess(data)

    @_placed
    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> Any:
        """BaseHandler's explanations of the batch's plain value, placed per request."""
        parent: Any = super()
        return parent.explain_handle(data_preprocess, raw_data)
