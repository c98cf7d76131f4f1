"""Benchmark: the request path's CPU per request between the exchange and the worker, in one
process (issue 16).

Run from the repository root (a few seconds):

    .venv/bin/python benchmarks/request_path_cost.py [--batch B] [--requests N] [--rounds R]
        [--depth D]

On a running event loop it sends N requests through the daemon's own code from the point a
REST exchange has its body to the point its answer is handed back: an `InferenceRequest` per
request, queued on a real `ModelQueue` with its deadline (`tsctl.server.inference.submit`),
then a real `WorkerPool` serving loop's `_Chain` sends them, batches of B (each batch frame
encoded with `tsctl.ipc.codec.encode`, the batch's metrics in the default
`metrics_mode=log`), and each `Result` frame is read back with a `FrameReader` fed the bytes
a worker would send (B JSON answers); each answer reaches a callback, as
`PredictionExchange._respond` gets it. The worker is a stand-in (no process, no socket) that
answers up to D results per turn of the loop (`--depth`, default 1), handed over as one read
of its socket (several go through the pool's group, `WorkerPool._grouped`): at batch size 1
the chain writes requests behind the one running, and a busy daemon reads that many results
in one turn. There is no HTTP: what is left is what `daemon_cost.py` cannot
separate from the sockets, the parser and the machine's load. It prints the CPU µs per
request (process time), the best of R rounds.

Point `PYTHONPATH` at another checkout to compare two versions on a busy machine (the tree
must have `_Chain` with its `send_then` results: commit 0b32174 or later).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tsctl.ipc import codec
from tsctl.ipc.messages import Batch, Part, Result, WireResponse, WorkerState
from tsctl.server import inference
from tsctl.server.batching import ModelQueue, next_batch
from tsctl.server.request import InferenceRequest, Response, new_request_id
from tsctl.server.telemetry import logs
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers import pool as pool_module
from tsctl.server.workers.pool import PoolSettings, WorkerPool

BODY = b'{"data": [' + b", ".join(b"0.5" for _ in range(16)) + b"]}"
HEADERS = [
    ("Host", "127.0.0.1:8080"),
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(BODY))),
]


class Worker:
    """Answers the batches written to it in order, up to `depth` per turn of the loop, each
    with the frame a worker would send for it, decoded as `WorkerProcess` decodes it."""

    worker_id = "9000"
    recycling = False

    def __init__(self, batch: int, depth: int) -> None:
        answers = [WireResponse(200, "application/json", b'{"y": [0.1, 0.2, 0.3, 0.4]}')] * batch
        self.frames = {
            n: b"".join(bytes(b) for b in codec.encode(Result(1, answers[:n], None, 0.05)))
            for n in range(1, batch + 1)
        }
        self.depth = depth
        self.reader = codec.FrameReader(1 << 20)
        self.state = WorkerState.READY
        self.served = 0
        self._pending: deque[tuple[int, Callable[[Any], None]]] = deque()
        self._armed = False
        self.grouped: Callable[[Callable[[], None]], None] | None = None

    def send_then(
        self, batch: Batch, on_result: Callable[[Any], None], on_chunk: Any, behind: bool = False
    ) -> None:
        codec.encode(batch)  # what `WorkerProcess` writes
        self._pending.append((len(batch.requests), on_result))
        self.state = WorkerState.BUSY
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._answer)

    def flush_writes(self) -> None:
        """`WorkerProcess.flush_writes`: nothing is held here (nothing is written)."""

    def _answer(self) -> None:
        self._armed = False
        due = [self._pending[i][0] for i in range(min(self.depth, len(self._pending)))]
        messages = self.reader.feed(b"".join(self.frames[n] for n in due))

        def handle() -> None:
            for message in messages:
                _, on_result = self._pending.popleft()
                if not self._pending:
                    self.state = WorkerState.READY
                on_result(message)

        if len(messages) > 1 and self.grouped is not None:  # as `WorkerProcess` hands them
            self.grouped(handle)
        else:
            handle()
        if self._pending and not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._answer)

    def write_backlog(self) -> int:
        return 0


async def per_request(batch: int, requests: int, depth: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        files = logs.setup(Path(folder), Path(folder), None, False)
        stats = Metrics("log", server_log=files.server_metrics, model_log=files.model_metrics)
        queue = ModelQueue(1 << 16)
        settings = PoolSettings(batch, 0.0, 30.0, 1 << 20)
        pool = WorkerPool("mlp", ("mlp", "1.0"), queue, settings, None, stats)  # type: ignore[arg-type]
        worker = Worker(batch, depth)
        worker.grouped = pool._grouped
        pool.workers.append(worker)  # type: ignore[arg-type]
        mv = SimpleNamespace(
            name="mlp",
            version="1.0",
            batch_size=batch,
            response_timeout=120.0,
            queue=queue,
            pool=SimpleNamespace(target=1),
        )
        answered = 0

        def respond(outcome: Response | BaseException) -> None:
            nonlocal answered
            assert isinstance(outcome, Response), outcome
            answered += 1

        loop = asyncio.get_running_loop()
        chain = pool_module._Chain(pool, worker, loop)  # type: ignore[arg-type]
        total = requests // batch * batch
        started = time.process_time()
        for _ in range(total):
            request = InferenceRequest(
                new_request_id(None),
                [Part("body", "application/json", BODY)],
                HEADERS,
                loop.time(),
            )
            inference.submit(mv, request, None, respond)  # type: ignore[arg-type]
        while answered < total:
            ended = chain.start(await next_batch(queue, batch, 0.0, worker))
            if ended is not None:
                await ended
        elapsed = time.process_time() - started
        files.close()
        assert answered == total, answered
        return elapsed / answered * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--depth", type=int, default=1, help="results read per loop turn")
    args = parser.parse_args(argv)
    best = min(
        asyncio.run(per_request(args.batch, args.requests, args.depth)) for _ in range(args.rounds)
    )
    print(
        f"batch {args.batch}, depth {args.depth}: {best:.1f} µs of CPU per request "
        f"(best of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
