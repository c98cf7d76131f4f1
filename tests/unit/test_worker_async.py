"""The worker's side of async handlers: `Service.run_batch` awaits a handler's coroutine (and
streams an async generator's lists) only when `awaits`; without it an awaitable is the
configuration error naming `asyncCommunication`, and loading an `async def` handler fails."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tsctl.ipc.messages import Batch, Chunk, FailureKind, Part, WireRequest
from tsctl.worker.context import Context
from tsctl.worker.loader import HandlerLoadError, load_entry
from tsctl.worker.service import Service


def batch(*bodies: bytes) -> Batch:
    requests = [
        WireRequest(f"r{i}", [Part("body", "application/json", b)]) for i, b in enumerate(bodies)
    ]
    return Batch(7, requests)


def context() -> Context:
    return Context("m", "/nowhere", {}, 1, None, "test")


async def doubled(rows: list[Any], ctx: Context) -> list[Any]:
    await asyncio.sleep(0)
    return [row["body"]["n"] * 2 for row in rows]


def test_a_coroutine_is_awaited_when_the_worker_awaits() -> None:
    service = Service(doubled, context())
    service.awaits = True
    result = asyncio.run(service.run_batch(batch(b'{"n": 1}', b'{"n": 4}')))
    assert result.failure is None
    assert [json.loads(r.body) for r in result.responses] == [2, 8]


def test_a_coroutine_without_the_setting_is_a_configuration_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, not left "never awaited"
        result = Service(doubled, context()).run(batch(b'{"n": 1}'))
    assert result.failure is not None
    assert result.failure.kind is FailureKind.MISCONFIGURED
    assert "'asyncCommunication: true'" in result.failure.message


def test_an_async_generator_streams_its_lists() -> None:
    async def streaming(rows: list[Any], ctx: Context) -> AsyncIterator[list[str]]:
        for step in range(3):
            yield [f"part{step}" for _ in rows]

    chunks: list[Chunk] = []
    service = Service(streaming, context())
    service.awaits = True
    result = asyncio.run(service.run_batch(batch(b"{}"), chunks.append))
    assert [c.responses[0].body for c in chunks] == [b"part0", b"part1"]
    assert result.responses[0].body == b"part2"


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("async def handle(data, context):\n    return data\n", "handler function 'handle'"),
        (
            "class H:\n    async def handle(self, data, context):\n        return data\n",
            "H.handle",
        ),
        (
            "class H:\n    async def initialize(self, context):\n        pass\n"
            "    def handle(self, data, context):\n        return data\n",
            "H.initialize",
        ),
    ],
)
def test_loading_an_async_handler_without_the_setting_fails(
    tmp_path: Path, source: str, what: str
) -> None:
    name = f"h_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    with pytest.raises(HandlerLoadError, match="asyncCommunication: true") as raised:
        load_entry(name, str(tmp_path), context())
    assert str(raised.value).startswith(f"{what} is asynchronous (async def)")


def test_an_async_module_handler_is_awaited_at_load_with_the_setting(tmp_path: Path) -> None:
    (tmp_path / "h_loaded.py").write_text(
        "seen = []\nasync def handle(data, context):\n    seen.append(data)\n    return data\n"
    )
    loop = asyncio.new_event_loop()
    try:
        entry = load_entry("h_loaded", str(tmp_path), context(), loop.run_until_complete)
    finally:
        loop.close()
    assert entry.__module__ == "h_loaded"
    assert __import__("h_loaded").seen == [None]
