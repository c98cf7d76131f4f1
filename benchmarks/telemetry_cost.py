"""Benchmark: the daemon's telemetry CPU per request, in one process (issue 16).

Run from the repository root (a few seconds):

    .venv/bin/python benchmarks/telemetry_cost.py [--batch B] [--requests N]

It makes, on a running event loop, the telemetry calls the daemon makes for N requests
answered in batches of B: per batch the worker pool's `_record_dispatch` and `_record_result`
(queue latency, QueueTime, batch size, WorkerThreadTime, HandlerTime, PredictionTime), per
request the requests and latency totals, the status count (`Requests2XX`) and the access-log
line; one event-loop turn per batch. Everything goes through the real `Metrics` in the default
`metrics_mode=log` and the real log files (in a temporary folder). It prints the CPU µs per
request (process time), less the cost of the same number of empty loop turns.

It isolates what `benchmarks/daemon_cost.py` measures as part of the daemon's whole cost, so
that two versions of the telemetry can be compared on a busy machine: run it with
`PYTHONPATH` pointing at each version's checkout. The pool and the exchanges are not built:
the pool's two methods are called on a stand-in holding only what they read.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from tsctl.server.api.rest import access_line
from tsctl.server.telemetry import logs
from tsctl.server.telemetry.prometheus import HOSTNAME, Metrics
from tsctl.server.workers.pool import WorkerPool


async def per_request(batch: int, requests: int, telemetry: bool) -> float:
    with tempfile.TemporaryDirectory() as folder:
        files = logs.setup(Path(folder), Path(folder), None, False)
        stats = Metrics("log", server_log=files.server_metrics, model_log=files.model_metrics)
        pool = SimpleNamespace(metrics=stats, model_name="mlp", version="1.0")
        request = SimpleNamespace(arrival=time.perf_counter(), request_id="0" * 36)
        jobs = [SimpleNamespace(request=request) for _ in range(batch)]
        result = SimpleNamespace(handler_ms=0.42, metrics=())
        labels = ("mlp", "1.0", HOSTNAME)
        client = "127.0.0.1:50000"
        started = time.process_time()
        for _ in range(requests // batch):
            if telemetry:
                WorkerPool._record_dispatch(pool, jobs, time.perf_counter())  # type: ignore[arg-type]
                WorkerPool._record_result(pool, result, jobs, 1.3)  # type: ignore[arg-type]
                for _ in range(batch):
                    stats.requests_total.inc(labels)
                    stats.latency.inc(labels, 1234.5)
                    files.access.write(
                        access_line(client, "POST", "/predictions/mlp", "HTTP/1.1", 200, 2.3)
                    )
                    stats.count_status(200)
            await asyncio.sleep(0)  # one loop turn per batch
        cpu = time.process_time() - started
        files.close()
    return cpu / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    costs = []
    for _ in range(args.rounds):
        full = asyncio.run(per_request(args.batch, args.requests, True))
        empty = asyncio.run(per_request(args.batch, args.requests, False))
        costs.append(full - empty)
    print(
        f"telemetry, batch {args.batch}: {min(costs):.1f} µs/request "
        f"(best of {args.rounds}; rounds: {', '.join(f'{c:.1f}' for c in costs)})"
    )


if __name__ == "__main__":
    main()
