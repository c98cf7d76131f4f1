"""`http1.Connection` and `http1.Server` on a fake transport, without sockets: pipelined
requests answered one per loop turn, reading paused while answers are not read, time limits
(driven through the server's sweep, with deadlines moved instead of waited for), the
connection limit, close callbacks, and what an application may not put in a response head.
Over real sockets: tests/e2e/test_http1.py and tests/e2e/test_http1_hostile.py."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from tsctl.server.api.http1 import Connection, Exchange, Limits, RequestHead, Server
from tsctl.server.api.http1.connection import (
    BODY,
    HEAD,
    IDLE,
    MAX_UNPARSED,
    header_block,
    status_line,
)
from tsctl.server.api.http1.parser import PIECE


class FakeTransport(asyncio.Transport):
    """Records what is written; closing calls `connection_lost` on the next loop turn."""

    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.reading = True
        self.eof = False

    def write(self, data: Any) -> None:
        assert not self.closing and not self.eof
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def statuses(self) -> list[int]:
        return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.out)]


class Echo(Exchange):
    """Answers the target (and the body's length) once the body is in; `/slow` waits for the
    test to call `release`."""

    held: ClassVar[list[Echo]] = []

    def __init__(self, conn: Connection, head: RequestHead) -> None:
        super().__init__(conn, head)
        self.size = 0

    def body_limit(self) -> int | None:
        return 100

    def headers_received(self) -> None:
        if self.head.path == "/refused":
            self.conn.respond(404, {}, b"no")

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)

    def too_large(self, size: int | None) -> None:
        self.conn.respond(413, {}, b"too large")

    def finish(self) -> None:
        if self.head.path == "/slow":
            Echo.held.append(self)
        else:
            self.release()

    def release(self) -> None:
        self.conn.respond(200, {}, f"{self.head.target} {self.size}".encode())


def error_response(exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    return getattr(exc, "http_status", 500), json.dumps({"message": str(exc)}).encode(), {}


def run(test: Callable[[Server], Awaitable[None]], limits: Limits | None = None) -> None:
    async def main() -> None:
        Echo.held = []
        server = Server(Echo, error_response, limits)
        await test(server)

    asyncio.run(main())


def connect(server: Server) -> tuple[Connection, FakeTransport]:
    conn = Connection(server)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


def get(target: str = "/ping", *headers: str) -> bytes:
    return "\r\n".join([f"GET {target} HTTP/1.1", "Host: x", *headers, "", ""]).encode()


async def turns(n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_pipelined_requests_are_answered_one_per_loop_turn() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        request = get()
        conn.data_received(request * 1000)
        assert transport.statuses() == [200]  # the rest waits for the loop
        assert len(conn.waiting) <= PIECE // len(request) + 1  # parsed at most a piece ahead
        await turns()
        assert transport.statuses() == [200, 200]
        for _ in range(2000):
            if len(transport.statuses()) == 1000:
                break
            await turns()
        assert transport.statuses() == [200] * 1000
        assert not conn.waiting and not conn.unparsed and transport.reading

    run(test)


def test_bytes_behind_a_request_in_progress_pause_reading_past_the_bound() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.data_received(get("/slow"))
        behind = get("/after")
        for _ in range(MAX_UNPARSED // len(behind) * 2):
            conn.data_received(behind)
        assert not transport.reading and transport.statuses() == []
        Echo.held[0].release()
        for _ in range(10000):
            if transport.reading:
                break
            await turns()
        assert transport.reading and transport.statuses()[0] == 200

    run(test)


def test_no_request_starts_while_the_write_buffer_is_over_its_mark() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.data_received(get("/a"))
        conn.pause_writing()  # the client reads nothing: the transport says stop
        assert not transport.reading
        conn.data_received(get("/b") + get("/c"))
        await turns(5)
        assert transport.statuses() == [200]
        conn.resume_writing()
        assert transport.reading
        await turns(5)
        assert transport.out.count(b"HTTP/1.1 200") == 3
        assert transport.out.endswith(b"/c 0")

    run(test)


def test_a_request_refused_at_its_head_is_answered_and_its_body_never_read() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        head = "POST /refused HTTP/1.1\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n"
        conn.data_received(head.encode())
        assert b"100 Continue" not in transport.out and transport.statuses() == [404]
        assert b"Connection: close" in transport.out and transport.eof
        assert conn.lingering and conn.deadline_kind != IDLE
        conn.data_received(b"x" * 50 + get("/next"))  # dropped, never parsed
        assert transport.statuses() == [404]
        assert not conn.eof_received()  # the client closes: so does the connection

    run(test)


def test_a_declared_body_over_the_limit_gets_413_before_it_is_read() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.data_received(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
        assert transport.statuses() == [413] and conn.lingering

    run(test)


def test_time_limits_follow_the_request() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        assert conn.deadline_kind == IDLE
        conn.data_received(b"POST / HTTP/1.1\r\nContent-")
        assert conn.deadline_kind == HEAD
        conn.data_received(b"Length: 4\r\n\r\nab")
        assert conn.deadline_kind == BODY
        conn.data_received(b"cd")
        await turns()
        assert transport.statuses() == [200] and conn.deadline_kind == IDLE

    run(test)


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"", None),
        (b"GET / HTTP/1.1\r\nX-Slow", 408),
        (b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab", 408),
    ],
    ids=["idle", "partial head", "partial body"],
)
def test_a_connection_over_its_time_limit_is_closed(sent: bytes, status: int | None) -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.data_received(sent)
        conn.deadline = server.loop.time() - 1  # as if the limit ran out
        server._sweep()
        assert transport.closing
        assert transport.statuses() == ([status] if status else [])
        if status:
            assert b"did not arrive within" in transport.out

    run(test)


def test_a_client_that_reads_nothing_for_the_keep_alive_timeout_is_dropped() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.pause_writing()
        server._sweep()
        assert not transport.closing
        conn.write_paused_at -= server.limits.keep_alive_timeout + 1
        server._sweep()
        assert transport.closing

    run(test)


def test_connections_past_max_connections_are_closed_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(server: Server) -> None:
        kept = [connect(server) for _ in range(2)]
        with caplog.at_level(logging.INFO, logger="tsctl.server"):
            refused = [connect(server) for _ in range(3)]
        assert all(t.closing for _, t in refused)
        assert not any(t.closing for _, t in kept)
        assert len(server.connections) == 2
        lines = [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()]
        assert len(lines) == 1 and "2 connections are open" in lines[0]
        await turns()  # the refused ones are lost: the count is unchanged
        kept[0][0].data_received(get())
        assert kept[0][1].statuses() == [200]

    run(test, Limits(max_connections=2))


def test_close_callbacks_run_once_when_the_connection_is_lost() -> None:
    async def test(server: Server) -> None:
        conn, _ = connect(server)
        seen: list[Connection] = []
        conn.when_closed(seen.append)
        conn.when_closed(seen.append)  # the same callback: once
        assert not conn.closed()
        conn.close()
        await turns()
        assert seen == [conn] and conn.closed() and conn not in server.connections
        conn.when_closed(seen.append)  # already closed: at once
        assert seen == [conn, conn]

    run(test)


def test_an_application_reason_phrase_with_a_line_break_is_not_sent() -> None:
    assert status_line(201, "Made") == "HTTP/1.1 201 Made\r\n"
    assert status_line(201, "Made\r\nSet-Cookie: x=1") == "HTTP/1.1 201 Created\r\n"
    assert status_line(299, "a\x00b") == "HTTP/1.1 299 Unknown\r\n"
    assert status_line(200, None) == "HTTP/1.1 200 OK\r\n"


def test_header_block_drops_headers_that_would_forge_others() -> None:
    block = header_block(200, None, [("X-A", "1"), ("X-B", "a\nb"), ("X C", "2"), ("X-D", "\x00")])
    assert block == b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"


def test_application_framing_headers_are_dropped() -> None:
    async def test(server: Server) -> None:
        conn, transport = connect(server)
        conn.head = RequestHead("GET", "/", "HTTP/1.1", [])
        conn.in_progress = True
        headers = {"content-length": "999", "Transfer-Encoding": "chunked", "X-Kept": "1"}
        assert conn.respond(200, headers, b"body")
        head = transport.out.split(b"\r\n\r\n")[0].lower()
        assert b"content-length: 4" in head and b"999" not in head
        assert b"transfer-encoding" not in head and b"x-kept: 1" in head

    run(test)


def test_stopping_closes_idle_connections_now_and_busy_ones_after_their_answer() -> None:
    async def test(server: Server) -> None:
        idle, idle_t = connect(server)
        idle.data_received(get())
        await turns()
        busy, busy_t = connect(server)
        busy.data_received(get("/slow") + get("/behind"))  # one in progress, one pipelined
        partial, partial_t = connect(server)
        partial.data_received(b"GET /late HTTP/1.1\r\nHo")  # a head begun before the stop
        server.stop()
        # the idle one ends now, after its answer, before any byte of a next request
        assert idle_t.closing and idle_t.statuses() == [200]
        assert not busy_t.closing and not partial_t.closing
        Echo.held[0].release()
        await turns()
        assert busy_t.statuses() == [200] and busy_t.closing  # the pipelined one: not started
        assert b"Connection: close" in busy_t.out
        partial.data_received(b"st: x\r\n\r\n")
        await turns()
        assert partial_t.statuses() == [200] and partial_t.closing
        assert b"Connection: close" in partial_t.out
        await turns()
        assert not server.connections

    run(test)


def test_a_connection_made_once_stopping_is_closed_at_once() -> None:
    async def test(server: Server) -> None:
        server.stop()
        conn, transport = connect(server)  # accepted before the listener closed
        assert transport.closing and conn not in server.connections

    run(test)
