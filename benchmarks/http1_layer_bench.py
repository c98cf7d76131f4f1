"""CPU per request of the inference port's HTTP/1.1 layer alone (`tsctl.server.api.http1`).

A keep-alive client's requests (the MLP POST of serve_bench, one `data_received` each) are fed
to one `Connection` on a fake transport and answered at once by a trivial exchange, with one
turn of the event loop per request; the figure is process CPU time per request, the best of 5
rounds. No sockets, no workers: what it measures is the parser and the connection, and it is
less moved by other processes than a wrk run. For an A/B, run it once per tree:

    cd /tmp && PYTHONPATH=TREE .venv/bin/python TREE/benchmarks/http1_layer_bench.py [N]

(from a directory other than a checkout, so that PYTHONPATH decides which `tsctl` is imported).
It works with the layer before and after the move to httptools (their `Server` signatures
differ).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import time
from typing import Any

from tsctl.server.api import http1

BODY = json.dumps([0.1] * 16).encode()
REQUEST = (
    b"POST /predictions/mlp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class Answer(http1.Exchange):
    def body_limit(self) -> int | None:
        return 6553500

    def finish(self) -> None:
        headers = {"Content-Type": "application/json", "x-request-id": "abc"}
        self.conn.respond(200, headers, b"[0.1, 0.2, 0.3, 0.4]")


def error_response(exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    return 500, b"{}", {}


async def main(n: int) -> None:
    params = inspect.signature(http1.Server).parameters
    if "discard_limit" in params:  # the hand parser's layer
        server = http1.Server(Answer, error_response, 64 << 20)  # type: ignore[arg-type]
    else:
        server = http1.Server(Answer, error_response)
    conn = http1.Connection(server)
    transport = Transport()
    conn.connection_made(transport)
    for _ in range(2000):  # warm-up
        conn.data_received(REQUEST)
        await asyncio.sleep(0)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            conn.data_received(REQUEST)
            await asyncio.sleep(0)
        best = min(best, time.process_time() - start)
    assert transport.writes >= 5 * n
    print(f"{http1.__file__}: {best / n * 1e6:.2f} us CPU per request (best of 5 x {n})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50000))
