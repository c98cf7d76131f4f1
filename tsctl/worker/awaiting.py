"""What a handler's `async def` answers become, and the error when the model is not set up
for them.

A handler may answer a batch with an awaitable (an `async def handle`) or an async generator
(an `async def handle` that yields lists: each but the last is sent as intermediate answers).
Only a model with `asyncCommunication: true` in its model-config.yaml runs its handler on an
event loop (`tsctl.worker.async_service`); any other model meets `NOT_ASYNC`, a configuration
error naming the setting: at load for a coroutine function, per batch for an awaitable a plain
function returned. Runs on the worker's main thread (its event loop, with the setting).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

#: why a handler's awaitable is refused without the setting (`{what}`: what returned it)
NOT_ASYNC = (
    "{what} is asynchronous (async def), which needs 'asyncCommunication: true' in the "
    "model's model-config.yaml"
)


def is_async(answers: Any) -> bool:
    """Whether a handler answered with something to await or to iterate asynchronously."""
    return inspect.isawaitable(answers) or inspect.isasyncgen(answers)


def discard(answers: Any) -> None:
    """Close a coroutine that will never run (no "never awaited" warning); an async
    generator never started needs nothing."""
    if inspect.iscoroutine(answers):
        answers.close()


async def settle(answers: Any, intermediate: Callable[[Sequence[Any]], None]) -> Any:
    """The final answer of an awaitable or async generator; an async generator's earlier
    lists go to `intermediate` (like a generator handler's)."""
    if inspect.isasyncgen(answers):
        return await _last_of(answers, intermediate)
    return await answers


async def _last_of(
    produced: AsyncIterator[Any], intermediate: Callable[[Sequence[Any]], None]
) -> Any:
    last: Any = None
    async for item in produced:
        if last is not None:
            intermediate(last)
        last = item
    return [] if last is None else last


def settled_at_load(value: Any, run: Callable[[Awaitable[Any]], Any] | None, what: str) -> Any:
    """`value` as the handler's load step returned it, awaited with `run` (the worker's
    loop) when it is awaitable; without a loop (no `asyncCommunication`) an awaitable is the
    configuration error, raised as `NotAsync`."""
    if not inspect.isawaitable(value):
        return value
    if run is None:
        discard(value)
        raise NotAsync(NOT_ASYNC.format(what=what))
    return run(value)


class NotAsync(Exception):
    """A handler is asynchronous but its model is not set up for it (`NOT_ASYNC`)."""
