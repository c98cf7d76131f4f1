"""Benchmark: the floor of one Python event loop on this machine, for issue 16's target.

Run from the repository root (about 30 seconds):

    .venv/bin/python benchmarks/asyncio_floor.py [--conc 32] [--duration S] [--uvloop]

A minimal HTTP/1.1 server in a child process (asyncio `Protocol`, httptools' parser, keep-alive,
one fixed 92-byte JSON answer, about the MLP's, written per request: no queue, no worker, no
logging, no metrics)
is driven by wrk (`-t1 -c<conc>`, the MLP's POST body) and the CPU it used per answered
request is printed (from /proc/<pid>/stat). tsctl's daemon does all of that plus queueing,
batching, framing for a worker, reading the worker's answer, an access log and metrics, so its
µs per request (benchmarks/daemon_cost.py) can be read against this floor.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import MLP_BODY
from benchmarks.lib.load import run_wrk
from benchmarks.lib.procs import machine_line, stat_fields

SERVER = r"""
import asyncio, socket, sys
import httptools

BODY = b"[" + b"0.0123456789, " * 6 + b"0.0123]"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY), BODY)


class Conn(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.transport.write(ANSWER)


async def main(fd, use_uvloop):
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    server = await loop.create_server(Conn, sock=sock)
    print("ready", flush=True)
    await server.serve_forever()

if sys.argv[2] == "1":
    import uvloop
    uvloop.install()
asyncio.run(main(int(sys.argv[1]), sys.argv[2] == "1"))
"""


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conc", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--uvloop", action="store_true", help="uvloop instead of asyncio's loop")
    args = parser.parse_args(argv)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    body = Path(f"/tmp/asyncio-floor-{os.getpid()}.json")
    body.write_text(json.dumps(MLP_BODY))
    flag = "1" if args.uvloop else "0"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(listener.fileno()), flag],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        run_wrk(port, "/predictions/mlp", body, "application/json", args.conc, 2, 10)
        before, t0 = cpu_seconds(proc.pid), time.perf_counter()
        load = run_wrk(
            port, "/predictions/mlp", body, "application/json", args.conc, args.duration, 10
        )
        used, wall = cpu_seconds(proc.pid) - before, time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
        body.unlink(missing_ok=True)
    answered = load.rps * load.seconds
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"asyncio_floor: {machine_line()}; Python {sys.version.split()[0]}; {loop}")
    per_request = used / answered * 1e6 if answered else 0.0
    print(
        f"c={args.conc}: {load.rps:.0f} req/s, server {per_request:.1f} µs/req "
        f"({used / wall:.2f} cores) {load.problems()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
