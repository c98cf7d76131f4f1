"""Hostile clients against the inference port, each while a well-behaved client keeps being
served: every hostile connection gets a 4xx, a close, or is timed out by the daemon; the
daemon's memory stays bounded and no worker dies; the other client keeps getting 200s (its
latency p50/p99 during the attack is reported).

One daemon serves the module, with short client timeouts so that the attacks are quick:
`request_header_timeout`, `request_body_timeout` and `keep_alive_timeout` of 2 seconds. An
attacker's connection that the daemon has neither answered nor closed within the timeout plus
`SLACK` counts as "open", a failure.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import reliability as rel
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

TIMEOUT = 2.0
SLACK = 4.0
#: growth of the daemon's RSS allowed during one attack
RSS_GROWTH_KB = 64 * 1024
#: the well-behaved client's p99 during an attack
GOOD_P99_MS = 1000.0
IDLE_CONNECTIONS = int(rel.sized(2000, 2000))
#: the shortest time the well-behaved client is measured in one attack (seconds)
MIN_WINDOW = 1.0
GOOD = rel.post("/predictions/swiss", b'{"action": "echo"}')


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(
        tmp_path_factory.mktemp("hostile"),
        {
            "request_header_timeout": TIMEOUT,
            "request_body_timeout": TIMEOUT,
            "keep_alive_timeout": TIMEOUT,
            "default_workers_per_model": 1,
        },
    )
    make_archive(server.store, "swiss", "swiss")
    server.start("swiss.mar")
    assert server.info is not None
    yield server
    pid = server.info.pid
    server.stop()
    if rel.alive(pid):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def attack(srv: Server, name: str) -> Iterator[dict[str, Any]]:
    """Run the body as an attack: a well-behaved client served throughout, the daemon
    sampled; then report and check. The body fills `found["outcomes"]` (a Counter)."""
    assert srv.info is not None
    restarts = rel.total(rel.scrape(srv.info.metrics_address), "tsctl_worker_restarts_total")
    found: dict[str, Any] = {"outcomes": Counter()}
    good = rel.Load(srv.inference, GOOD, clients=1, deadline=10, pause=0.01)
    with rel.Sampler(srv.info.pid) as sampler, good:
        started = time.monotonic()
        yield found
        # the good client is measured for a second at least, and until the model is whole
        # again (a worker that an attack killed has been replaced and counted)
        time.sleep(max(0.0, started + MIN_WINDOW - time.monotonic()))
        srv.wait_for(lambda: model_ready(srv))
        good.stop()
    restarted = (
        rel.total(rel.scrape(srv.info.metrics_address), "tsctl_worker_restarts_total") - restarts
    )
    served = good.outcomes.figures()
    rel.report(
        f"hostile: {name}",
        {
            "attacker": dict(found["outcomes"]),
            "good_client": served,
            "worker_restarts": restarted,
            "daemon": sampler.figures(),
        },
    )
    assert set(found["outcomes"]) <= {"answered", "closed", "timed-out-by-daemon"} | {
        str(c) for c in range(400, 500)
    } | {"501"}, found["outcomes"]
    assert restarted == 0
    assert sampler.rss.peak - sampler.rss.start < RSS_GROWTH_KB, sampler.figures()
    assert served["sent"] > 0 and served["statuses"] == {"200": served["sent"]}, served
    assert served["latency_ms"]["p99"] < GOOD_P99_MS, served


def model_ready(srv: Server) -> bool:
    workers = srv.manage("GET", "/models/swiss").json()[0]["workers"]
    return bool(workers) and all(w["status"] == "READY" for w in workers)


def connect(srv: Server) -> socket.socket:
    sock = socket.create_connection(rel.host_port(srv.inference), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def verdict(sock: socket.socket, deadline: float) -> str:
    """How the daemon treated a connection by `deadline`: the status it answered, "closed"
    (or reset), or "open"."""
    received = b""
    poller = select.poll()  # not select(): the idle-connections attack goes past fd 1024
    poller.register(sock, select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            break
        try:
            data = sock.recv(65536)
        except ConnectionError:
            return "closed"
        if not data:
            return "closed" if not received else received.split(b" ", 2)[1].decode()
        received += data
        if b"\r\n" in received:
            return received.split(b" ", 2)[1].decode()
    return "open"


def trickle(socks: list[socket.socket], piece: Callable[[int], bytes], until: float) -> None:
    """Send each socket `piece(i)` every half second until `until` or until it is closed."""
    i = 0
    live = list(socks)
    while live and time.monotonic() < until:
        for sock in list(live):
            try:
                sock.sendall(piece(i))
            except OSError:
                live.remove(sock)
        i += 1
        time.sleep(0.5)


def slow_attack(srv: Server, name: str, head: bytes, piece: bytes) -> None:
    with attack(srv, name) as found:
        socks = [connect(srv) for _ in range(20)]
        for sock in socks:
            sock.sendall(head)
        until = time.monotonic() + TIMEOUT + SLACK
        sender = threading.Thread(target=trickle, args=(socks, lambda i: piece, until))
        sender.start()
        for sock in socks:
            found["outcomes"][verdict(sock, until)] += 1
        sender.join()
        for sock in socks:
            sock.close()


def test_slowloris_heads(srv: Server) -> None:
    slow_attack(srv, "slowloris heads", b"POST /predictions/swiss HTTP/1.1\r\n", b"X-a: b\r\n")


def test_slow_bodies(srv: Server) -> None:
    head = rel.post("/predictions/swiss", b"")[:-2] + b"Content-Length: 100000\r\n\r\n"
    head = head.replace(b"Content-Length: 0\r\n", b"")
    slow_attack(srv, "slow bodies", head, b"x")


def test_pipelining_client_that_never_reads(srv: Server) -> None:
    with attack(srv, "pipelining, never reading") as found:
        sock = connect(srv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(1.0)
        batch = b"GET /api-description HTTP/1.1\r\nHost: x\r\n\r\n" * 100
        sent = 0
        ended = "pipelined"
        until = time.monotonic() + 8
        while sent < 100_000 and time.monotonic() < until:  # ~2,500 requests at most
            try:
                sock.sendall(batch)
            except TimeoutError:
                ended = "daemon stopped reading"
                break
            except OSError:
                ended = "closed"
                break
            sent += len(batch)
        time.sleep(1)  # let the daemon work through what it read
        found["outcomes"]["closed" if ended == "closed" else "timed-out-by-daemon"] += 1
        found["requests_sent"] = sent
        sock.close()


def test_oversized_heads(srv: Server) -> None:
    with attack(srv, "oversized heads") as found:
        for _ in range(10):
            sock = connect(srv)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /ping HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
            found["outcomes"][verdict(sock, time.monotonic() + SLACK)] += 1
            sock.close()


def one_request(srv: Server, raw: bytes) -> str:
    sock = connect(srv)
    try:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        return verdict(sock, time.monotonic() + TIMEOUT + SLACK)
    finally:
        sock.close()


def multipart(body: bytes, boundary: str = "b") -> bytes:
    return rel.post("/predictions/swiss", body, f"multipart/form-data; boundary={boundary}")


def test_malformed_and_oversized_multipart(srv: Server) -> None:
    cases = [
        multipart(b"--b\r\nno headers end"),
        multipart(b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n"),
        multipart(b"garbage", boundary=""),
        multipart(b"--b\r\n" * 10_000),
        rel.post("/predictions/swiss", b"", "multipart/form-data; boundary=b")[:-2]
        + b"Content-Length: 7000000\r\n\r\n",
    ]
    with attack(srv, "malformed and oversized multipart") as found:
        for raw in cases:
            found["outcomes"][one_request(srv, raw.replace(b"Content-Length: 0\r\n", b""))] += 1


UTF8 = {
    "target": b"GET /predictions/sw\xff\xfeiss HTTP/1.1\r\nHost: x\r\n\r\n",
    "header": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Bad: \xff\xfe\xc0\xaf\r\n\r\n",
    "json-body": rel.post("/predictions/swiss", b'"\xff\xfe"'),
    "text-body": rel.post("/predictions/swiss", b"\xc0\xaf", "text/plain; charset=utf-8"),
}
#: cases a server may answer normally: header values may hold obs-text (RFC 9110), and a JSON
#: or text body that is not UTF-8 reaches the handler as bytes (as TorchServe hands it over)
ANSWERABLE = {"header", "json-body", "text-body"}


@pytest.mark.parametrize("case", list(UTF8))
def test_invalid_utf8(srv: Server, case: str) -> None:
    """Invalid UTF-8 in the target, in a header, in a JSON or text body: a 4xx or a close,
    no worker lost; a body the handler can take as bytes may be answered 200."""
    with attack(srv, f"invalid UTF-8: {case}") as found:
        got = one_request(srv, UTF8[case])
        found["outcomes"]["answered" if got == "200" and case in ANSWERABLE else got] += 1


def test_deeply_nested_json(srv: Server) -> None:
    with attack(srv, "deeply nested JSON") as found:
        body = b"[" * 200_000 + b"]" * 200_000
        found["outcomes"][one_request(srv, rel.post("/predictions/swiss", body))] += 1


def test_control_bytes_in_field_names(srv: Server) -> None:
    with attack(srv, "control bytes in field names") as found:
        body = b"\x01" * 2_900_000 + b"=1"
        raw = rel.post("/predictions/swiss", body, "application/x-www-form-urlencoded")
        found["outcomes"][one_request(srv, raw)] += 1


FRAMING = {
    "cl-and-chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "empty-cl-and-chunked": b"Content-Length:\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "unicode-digit-cl": "Content-Length: ²\r\n\r\nxx".encode(),
    "gzip-chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunked-twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative-cl": b"Content-Length: -1\r\n\r\n",
    "bare-lf-header": b"X-A: b\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_conflicting_framing_headers(srv: Server, case: str) -> None:
    raw = b"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\n" + FRAMING[case]
    with attack(srv, f"conflicting framing: {case}") as found:
        found["outcomes"][one_request(srv, raw)] += 1


def test_thousands_of_idle_connections(srv: Server) -> None:
    with attack(srv, f"{IDLE_CONNECTIONS} idle connections") as found:
        socks = []
        for _ in range(IDLE_CONNECTIONS):
            try:
                socks.append(connect(srv))
            except OSError:
                found["outcomes"]["closed"] += 1  # refused beyond max_connections
        until = time.monotonic() + TIMEOUT + SLACK
        for sock in socks:
            found["outcomes"][verdict(sock, until)] += 1
            sock.close()
