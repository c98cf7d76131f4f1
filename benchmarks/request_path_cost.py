"""Benchmark: the request path's CPU per request between the exchange and the worker, in one
process (issue 16).

Run from the repository root (a few seconds):

    .venv/bin/python benchmarks/request_path_cost.py [--batch B] [--requests N] [--rounds R]

On a running event loop it sends N requests through the daemon's own code from the point a
REST exchange has its body to the point its answer is handed back: an `InferenceRequest` per
request, queued on a real `ModelQueue` with its deadline (`tsctl.server.inference`), batches
of B taken with `next_batch`, sent and answered by `WorkerPool._send` and `_finish` (the batch
frame encoded with `tsctl.ipc.codec.encode`, the batch's metrics in the default
`metrics_mode=log`), and a `Result` frame read back with a `FrameReader` fed the bytes a worker
would send (B JSON answers); each answer reaches a callback, as `PredictionExchange._respond`
gets it. One event-loop turn per batch. The worker is a stand-in that answers at once (no
process, no socket), and there is no HTTP: what is left is what `daemon_cost.py` cannot
separate from the sockets, the parser and the machine's load. It prints the CPU µs per
request (process time), the best of R rounds.

Runs against older trees too (those with `Pending.when_done` and no `submit`): point
`PYTHONPATH` at each checkout to compare two versions on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
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
from tsctl.server.workers.pool import PoolSettings, WorkerPool

BODY = b'{"data": [' + b", ".join(b"0.5" for _ in range(16)) + b"]}"
HEADERS = [
    ("Host", "127.0.0.1:8080"),
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(BODY))),
]


class Worker:
    """Answers each batch at once with the frame a worker would send for it."""

    worker_id = "9000"

    def __init__(self, batch: int) -> None:
        answers = [WireResponse(200, "application/json", b'{"y": [0.1, 0.2, 0.3, 0.4]}')] * batch
        self.frames = {
            n: b"".join(bytes(b) for b in codec.encode(Result(1, answers[:n], None, 0.5)))
            for n in range(1, batch + 1)
        }
        self.served = 0

    state = WorkerState.READY

    def send(self, batch: Batch, on_chunk: Any = None) -> asyncio.Future[Any]:
        codec.encode(batch)  # what `WorkerProcess` writes
        [result] = codec.FrameReader(1 << 20).feed(self.frames[len(batch.requests)])
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        answered.set_result(result)
        return answered

    async def drain(self) -> None:
        pass


async def per_request(batch: int, requests: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        files = logs.setup(Path(folder), Path(folder), None, False)
        stats = Metrics("log", server_log=files.server_metrics, model_log=files.model_metrics)
        queue = ModelQueue(1 << 16)
        settings = PoolSettings(batch, 0.0, 30.0, 1 << 20)
        pool = WorkerPool("mlp", ("mlp", "1.0"), queue, settings, None, stats)  # type: ignore[arg-type]
        mv = SimpleNamespace(
            name="mlp",
            version="1.0",
            batch_size=batch,
            response_timeout=120.0,
            queue=queue,
            pool=SimpleNamespace(target=1),
        )
        worker = Worker(batch)
        answered = 0

        def respond(outcome: Response | BaseException) -> None:
            nonlocal answered
            assert isinstance(outcome, Response), outcome
            answered += 1

        submit = getattr(inference, "submit", None)
        started = time.process_time()
        for _ in range(requests // batch):
            for _ in range(batch):
                request = InferenceRequest(
                    new_request_id(None),
                    [Part("body", "application/json", BODY)],
                    HEADERS,
                    time.monotonic(),
                )
                if submit is not None:
                    submit(mv, request, None, respond)
                else:  # an older tree: a future and its done-callback
                    pending = inference.Pending(mv, request, None)  # type: ignore[arg-type]
                    getattr(pending, "when_done")(respond)  # noqa: B009
            jobs = await next_batch(queue, batch, 0.0, worker)
            sent = pool._send(worker, jobs)  # type: ignore[arg-type]
            assert sent is not None
            await pool._finish(worker, sent)  # type: ignore[arg-type]
            await asyncio.sleep(0)  # one loop turn per batch (the done-callbacks run in it)
        elapsed = time.process_time() - started
        await asyncio.sleep(0)
        files.close()
        assert answered == requests // batch * batch, answered
        return elapsed / answered * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    best = min(asyncio.run(per_request(args.batch, args.requests)) for _ in range(args.rounds))
    print(f"batch {args.batch}: {best:.1f} µs of CPU per request (best of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
