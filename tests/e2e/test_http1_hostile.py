"""The inference port against clients that do not play fair, over real sockets to a real
daemon: idle and slow clients (keep-alive, header and body time limits, set small here so the
tests are quick; each is asserted as "the connection is closed", with the socket timeout only
a deadlock guard), requests refused before their body, a client that pipelines and never
reads, the connection limit, and a request racing an unregister."""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_http1 import ECHO, JSON, Raw, post
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

LIMITS = {"keep_alive_timeout": 1, "request_header_timeout": 1, "request_body_timeout": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("hostile"), properties={**LIMITS, "enable_model_api": "true"}
    )
    make_archive(srv.store, "swiss", "swiss", version="1.0")
    make_archive(srv.store, "race", "swiss", version="1.0")
    srv.start("swiss.mar")
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr


@pytest.fixture
def raw(server: Server) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


def closed_without_answer(client: Raw) -> bool:
    """The server closed the connection (FIN or reset) and sent nothing."""
    try:
        return client.reader.read(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_keep_alive_connection_is_closed(raw: Raw) -> None:
    raw.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.reply().status == 200
    assert raw.at_eof()  # after keep_alive_timeout with no request


def test_a_connection_that_never_sends_is_closed(raw: Raw) -> None:
    assert raw.at_eof()


def test_a_head_that_never_ends_gets_408(server: Server, raw: Raw) -> None:
    raw.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
    reply = raw.reply()
    assert reply.status == 408 and reply.headers["connection"] == "close"
    assert "request head did not arrive" in reply.json()["message"]  # type: ignore[index]
    assert raw.at_eof()


def test_a_slowloris_head_gets_408_however_it_dribbles(raw: Raw) -> None:
    raw.send(b"GET /ping HTTP/1.1\r\n")
    raw.sock.settimeout(0.2)  # pacing, not a threshold: a line each time the server is quiet
    for n in range(150):  # 30 s of dribbling at most: the deadlock guard
        try:
            raw.sock.recv(1, socket.MSG_PEEK)
            break  # an answer (or the close)
        except TimeoutError:
            try:
                raw.send(f"X-Drip-{n}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
    raw.sock.settimeout(30)
    reply = raw.reply()
    assert reply.status == 408 and raw.at_eof()


def test_a_body_that_never_ends_gets_408(server: Server, raw: Raw) -> None:
    raw.send(
        b"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        + JSON.encode()
        + b"\r\n\r\n{"
    )
    reply = raw.reply()
    assert reply.status == 408 and reply.headers["connection"] == "close"
    assert "request body did not arrive" in reply.json()["message"]  # type: ignore[index]
    assert raw.at_eof()
    assert server.access_line('"POST /predictions/swiss HTTP/1.1" 408')


@pytest.mark.parametrize("expect", [True, False], ids=["Expect: 100-continue", "no Expect"])
def test_a_request_for_an_unknown_model_is_refused_before_its_body(raw: Raw, expect: bool) -> None:
    head = "POST /predictions/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
    raw.send((head + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode())
    reply = raw.reply()  # at once, without the body: no 100 Continue before it
    assert reply.status == 404 and reply.headers["connection"] == "close"
    assert raw.at_eof()


def test_framing_headers_set_by_a_handler_are_dropped(raw: Raw) -> None:
    for name, value in [("Content-Length", "1"), ("Transfer-Encoding", "chunked")]:
        body = json.dumps({"action": "header", "name": name, "value": value}).encode()
        raw.send(post("/predictions/swiss", body, JSON))
        reply = raw.reply()
        assert reply.status == 200 and reply.body == b"ok"
        assert "transfer-encoding" not in reply.headers
    raw.send(post("/predictions/swiss", ECHO, JSON))  # the framing held: the next one parses
    assert raw.reply().status == 200


def daemon_rss_kib(server: Server) -> int:
    assert server.info is not None
    status = Path(f"/proc/{server.info.pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_a_client_that_pipelines_and_never_reads_holds_bounded_memory(server: Server) -> None:
    count = 1000  # each answer is the 43 KB API description: 43 MB if all were buffered
    client = Raw(server)
    before = daemon_rss_kib(server)
    client.send(b"GET /api-description HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    for _ in range(20):  # other clients are served meanwhile
        assert server.request("GET", "/ping").status == 200
    grown = daemon_rss_kib(server) - before
    assert grown < 16 * 1024, f"the daemon grew by {grown} KiB"
    replies = [client.reply() for _ in range(count)]  # reading: everything comes, in order
    assert {r.status for r in replies} == {200} and len({len(r.body) for r in replies}) == 1
    client.close()


def test_a_request_that_found_its_model_before_an_unregister_fails_at_once(
    server: Server, raw: Raw
) -> None:
    registered = server.manage("POST", "/models?url=race.mar&initial_workers=1")
    assert registered.status == 200, registered.body
    raw.send(
        f"POST /predictions/race HTTP/1.1\r\nHost: x\r\nContent-Length: {len(ECHO)}\r\n"
        f"{JSON}\r\n\r\n".encode()
    )  # the head: the model version is found now
    assert server.predict("race", {"action": "echo"}).status == 200  # the head was read
    assert server.manage("DELETE", "/models/race").status == 200
    raw.send(ECHO)  # the body, after the unregister
    reply = raw.reply()  # at once, not after the response timeout (the socket's guard: 30 s)
    assert reply.status in (404, 503), reply.body
    raw.send(post("/predictions/swiss", ECHO, JSON))
    assert raw.reply().status == 200


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, properties={"max_connections": 3})
    make_archive(srv.store, "swiss", "swiss", version="1.0")
    srv.start("swiss.mar")
    yield srv
    assert srv.stop().returncode == 0


def ping(client: Raw) -> int:
    client.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    return client.reply().status


def test_connections_past_max_connections_are_closed_at_once(small: Server) -> None:
    opened: list[Raw] = []

    def connect() -> Raw:
        opened.append(Raw(small))
        return opened[-1]

    def served() -> bool:  # once the server has seen a close, a new one gets in
        try:
            return ping(connect()) == 200
        except (AssertionError, OSError):
            return False

    try:
        kept = [connect() for _ in range(3)]
        assert [ping(c) for c in kept] == [200] * 3
        for _ in range(4):
            assert closed_without_answer(connect())
        assert [ping(c) for c in kept] == [200] * 3  # the open ones are unaffected
        log = (small.log_dir / "ts_log.log").read_text()
        assert log.count("max_connections") == 1, log  # logged once, not per refusal
        kept[0].close()
        small.wait_for(served)
    finally:
        for client in opened:
            client.close()


def test_a_reset_connection_does_not_count_against_the_limit(small: Server) -> None:
    linger_zero = struct.pack("ii", 1, 0)
    for _ in range(10):
        client = Raw(small)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
        assert ping(client) == 200
        client.close()  # an RST
    clients: list[Raw] = []

    def served() -> bool:
        clients.append(Raw(small))
        try:
            return ping(clients[-1]) == 200
        except (AssertionError, OSError):
            return False

    small.wait_for(served)
    for client in clients:
        client.close()
