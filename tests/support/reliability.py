"""Tools of the reliability suite (tests/reliability): sizes, process figures from /proc, a
small keep-alive HTTP client on raw sockets, steady load on threads, metrics scraping, and the
report of each scenario's figures.

Sizes: `sized(ci, full)` picks the CI figure unless `TSCTL_RELIABILITY_SCALE=full`. Figures:
`report(name, figures)` prints them (seen with `-s`), keeps them for the run's terminal summary
(tests/reliability/conftest.py prints every scenario's, with or without `-s`) and writes them to
a JSON file (`TSCTL_RELIABILITY_REPORT`, or `reliability.json` in pytest's temporary base
directory).
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALE = os.environ.get("TSCTL_RELIABILITY_SCALE", "ci")
#: every scenario's figures, in the order they ran (the terminal summary prints them)
RESULTS: list[dict[str, Any]] = []
#: where `report` writes the JSON file (set by tests/reliability/conftest.py)
REPORT_PATH: list[Path] = []


def sized(ci: float, full: float) -> float:
    """The CI size, or the full one under `TSCTL_RELIABILITY_SCALE=full`."""
    return full if SCALE == "full" else ci


def report(name: str, figures: dict[str, Any]) -> None:
    entry = {"scenario": name, "scale": SCALE, **figures}
    RESULTS.append(entry)
    print(f"\n[reliability] {json.dumps(entry)}")
    if REPORT_PATH:
        REPORT_PATH[0].write_text(json.dumps(RESULTS, indent=2) + "\n")


# --- processes


def rss_kb(pid: int) -> int:
    """Resident memory of `pid` in KiB (VmRSS)."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Series:
    """A figure sampled over time: first, highest and last value."""

    start: int = 0
    peak: int = 0
    end: int = 0

    def add(self, value: int) -> None:
        if not self.start:
            self.start = value
        self.peak = max(self.peak, value)
        self.end = value

    def as_dict(self) -> dict[str, int]:
        return {"start": self.start, "peak": self.peak, "end": self.end}


class Sampler:
    """Samples a process's RSS and open fds on a thread until stopped (a context manager)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.rss = Series()
        self.fds = Series()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.rss.add(rss_kb(self.pid))
        self.fds.add(open_fds(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self) -> dict[str, Any]:
        return {"rss_kb": self.rss.as_dict(), "fds": self.fds.as_dict()}


# --- HTTP on raw sockets


def host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class Closed(Exception):
    """The server closed the connection before a whole answer."""


class Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read its answer (Content-Length
    or chunked), with a deadline per answer."""

    def __init__(self, address: str, timeout: float = 10) -> None:
        self.sock = socket.create_connection(host_port(address), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.open = True

    def close(self) -> None:
        self.open = False
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed("connection closed by the server")
        self.buffer += data

    def read_answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked()
        else:
            length = int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(self.buffer) < size + 2:
                self._fill()
            body += self.buffer[:size]
            self.buffer = self.buffer[size + 2 :]
            if size == 0:
                return body

    def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(raw)
        return self.read_answer()


def post(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    """A raw keep-alive POST request."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Outcomes:
    """What a client got: answers by status, failures by kind, latencies (ms)."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int | None, failure: str | None, ms: float) -> None:
        with self.lock:
            if status is not None:
                self.statuses[status] += 1
            if failure is not None:
                self.failures[failure] += 1
            self.latencies.append(ms)

    @property
    def sent(self) -> int:
        return len(self.latencies)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def figures(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.sent - self.answered,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failures": dict(self.failures),
            "latency_ms": {
                "p50": round(percentile(lat, 0.5), 2),
                "p99": round(percentile(lat, 0.99), 2),
                "max": round(max(lat, default=0.0), 2),
                "mean": round(statistics.fmean(lat), 2) if lat else 0.0,
            },
        }


class Load:
    """`clients` threads sending `request` over keep-alive connections (a new one every
    `per_connection` requests, and after any failure) until stopped or `total` are sent."""

    def __init__(
        self,
        address: str,
        request: bytes,
        clients: int = 2,
        per_connection: int = 0,
        deadline: float = 30,
        total: int = 0,
        pause: float = 0.0,
        check: Callable[[int, bytes], bool] | None = None,
    ) -> None:
        self.address = address
        self.request = request
        self.per_connection = per_connection
        self.deadline = deadline
        self.total = total
        self.pause = pause
        self.check = check
        self.outcomes = Outcomes()
        self.wrong: list[tuple[int, bytes]] = []
        self._issued = 0
        self._issue_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _take(self) -> bool:
        if self._stop.is_set():
            return False
        if not self.total:
            return True
        with self._issue_lock:
            if self._issued >= self.total:
                return False
            self._issued += 1
            return True

    def _run(self) -> None:
        conn: Connection | None = None
        used = 0
        while self._take():
            started = time.perf_counter()
            status = failure = None
            try:
                if conn is None or not conn.open:
                    conn, used = Connection(self.address, self.deadline), 0
                status, _, body = conn.request(self.request)
                used += 1
                if self.check is not None and not self.check(status, body):
                    self.wrong.append((status, body[:200]))
            except TimeoutError:
                failure = "timeout"
            except (Closed, ConnectionError) as exc:
                failure = type(exc).__name__
            except OSError as exc:
                failure = f"OSError {exc.errno}"
            ms = (time.perf_counter() - started) * 1000
            self.outcomes.add(status, failure, ms)
            if failure is not None or (self.per_connection and used >= self.per_connection):
                if conn is not None:
                    conn.close()
                conn = None
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.deadline + 5)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the metrics API


def scrape(metrics_address: str) -> dict[str, float]:
    """Every series of the metrics API: `name{labels}` → value."""
    conn = Connection(metrics_address)
    try:
        status, _, body = conn.request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        conn.close()
    assert status == 200, status
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total(scraped: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a family's series whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for series, value in scraped.items()
        if series.split("{", 1)[0] == name and all(w in series for w in wanted)
    )
