"""A real worker process fed frames no frontend sends, and a real pool whose serving loop
fails: the worker answers a frame it cannot read with a failure and serves on; a serving loop
that meets an unexpected error fails its batch and has its worker replaced, never leaving a
process running outside the pool."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.support.daemon import HANDLERS
from tsctl.errors import PredictionFailed
from tsctl.ipc.codec import MAGIC, MAX_META, PREFIX, VERSION, recv_message, send_message
from tsctl.ipc.messages import (
    Assign,
    Batch,
    FailureKind,
    Hello,
    Kind,
    Part,
    Result,
    Stop,
    WireRequest,
    WorkerSpec,
    WorkerState,
)
from tsctl.server.batching import ModelQueue
from tsctl.server.request import InferenceRequest, Job
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.pool import PoolSettings, WorkerPool
from tsctl.server.workers.process import WorkerProcess
from tsctl.server.workers.spares import spawn

pytestmark = pytest.mark.slow

SPEC = WorkerSpec(
    model_name="swiss",
    model_dir=str(HANDLERS),
    handler="swiss",
    manifest={"model": {"modelVersion": "1.0"}},
)
ECHO = Batch(2, [WireRequest("r2", [Part("body", "application/json", b'{"n": 2}')], [])])


@pytest.fixture
def worker() -> Iterator[tuple[Any, Any]]:
    popen, sock = spawn(preload=False)
    stream = sock.makefile("rb")
    try:
        send_message(sock, Assign(SPEC))
        assert isinstance(recv_message(stream), Hello)
        yield sock, stream
    finally:
        stream.close()
        sock.close()  # the worker reads the end of its stream and exits
        popen.wait(timeout=60)
        assert popen.stdout is not None and popen.stderr is not None
        popen.stdout.close()
        popen.stderr.close()


def test_a_frame_the_worker_cannot_read_is_answered_and_the_worker_serves_on(
    worker: tuple[Any, Any],
) -> None:
    sock, stream = worker
    junk = b"{" * (MAX_META + 1)  # a meta over the bound: read to its end, not parsed
    sock.sendall(PREFIX.pack(MAGIC, VERSION, Kind.BATCH, len(junk), 3) + junk + b"abc")
    rejected = recv_message(stream)
    assert isinstance(rejected, Result) and rejected.failure is not None
    assert rejected.failure.kind is FailureKind.BAD_FRAME
    assert "too large" in rejected.failure.message
    meta = b'{"id": 1, "reqs": [["r", [["a"]], []]], "lens": [1]}'  # a part without its type
    sock.sendall(PREFIX.pack(MAGIC, VERSION, Kind.BATCH, len(meta), 1) + meta + b"x")
    rejected = recv_message(stream)
    assert isinstance(rejected, Result) and rejected.failure is not None
    send_message(sock, ECHO)
    answered = recv_message(stream)
    assert isinstance(answered, Result) and answered.failure is None
    assert answered.responses[0].status == 200
    send_message(sock, Stop("done"))


def run_pool(settings: PoolSettings, body: Any) -> Any:
    async def main() -> Any:
        pool = WorkerPool(
            "swiss_1.0",
            ("swiss", "1.0"),
            ModelQueue(10),
            settings,
            lambda worker_id: WorkerProcess(replace(SPEC, worker_id=worker_id)),
            Metrics(),
        )
        try:
            return await body(pool)
        finally:
            await pool.close(PredictionFailed("closed"))

    return asyncio.run(main())


def test_an_unexpected_error_in_a_serving_loop_replaces_its_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = PoolSettings(1, 0, 30, 1 << 20)

    async def body(pool: WorkerPool) -> None:
        await pool.scale(1)
        [old] = pool.workers

        def broken(*args: Any) -> None:
            raise RuntimeError("a bug in the frontend's bookkeeping")

        pool._record_result = broken  # type: ignore[method-assign]  # a bug cannot be caused
        loop = asyncio.get_running_loop()
        request = InferenceRequest("r1", [Part("body", "application/json", b"{}")], [], 0.0)
        job = Job(request, loop.create_future(), loop.time() + 60)
        pool.queue.put(job)
        with pytest.raises(PredictionFailed, match="failed; it is replaced"):
            await job.future
        await old.dead.wait()  # killed, not left running outside the pool
        assert old.state is WorkerState.DEAD and old.proc is not None
        assert old.proc.returncode is not None
        del pool._record_result  # the class's own again
        deadline = time.monotonic() + 60
        while not (pool.workers and pool.workers[0].state is WorkerState.READY):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        [new] = pool.workers
        assert new is not old and new.pid != old.pid and new.pid is not None
        os.kill(new.pid, 0)  # running

    run_pool(settings, body)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "serving worker 9000-swiss_1.0 failed; replacing it"
    ]
    caplog.clear()
