"""tsctl's own HTTP/1.1 layer on the inference port, over raw sockets: keep-alive, pipelining,
chunked bodies, `Expect: 100-continue`, HTTP/1.0, and requests that break the protocol. Each
broken request gets its own 4xx and leaves the server answering everyone else."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("http1"))
    make_archive(srv.store, "swiss", "swiss", version="1.0")
    srv.start("swiss.mar")
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr
    # every request these tests broke off was accounted for: none held up the drain
    assert "still in flight" not in (srv.log_dir / "ts_log.log").read_text()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> object:
        return json.loads(self.body)


class Raw:
    """A client that writes exactly the bytes it is given and parses what comes back."""

    def __init__(self, server: Server) -> None:
        host, port = server.inference.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, head_only: bool = False) -> Reply:
        status_line = self.reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only:
            body = b""
        elif "content-length" in headers:
            body = self.reader.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while (size := int(self.reader.readline().split(b";")[0], 16)) > 0:
                body += self.reader.read(size)
                assert self.reader.read(2) == b"\r\n"
            assert self.reader.readline() == b"\r\n"
        else:
            body = self.reader.read()
        return Reply(status, headers, body)

    def at_eof(self) -> bool:
        return self.reader.read(1) == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def post(path: str, body: bytes, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


ECHO = json.dumps({"action": "echo"}).encode()
JSON = "Content-Type: application/json"


@pytest.fixture
def raw(server: Server) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


def still_serving(server: Server) -> None:
    response = server.predict("swiss", {"action": "echo"})
    assert response.status == 200, response.body


def test_keep_alive_serves_many_requests_on_one_connection(raw: Raw) -> None:
    pids = set()
    for _ in range(5):
        raw.send(post("/predictions/swiss", ECHO, JSON))
        reply = raw.reply()
        assert reply.status == 200
        assert "connection" not in reply.headers
        assert reply.headers["date"].endswith("GMT")
        pids.add(reply.json()["pid"])  # type: ignore[index]
    assert len(pids) == 1


def test_pipelined_requests_are_answered_in_order(raw: Raw) -> None:
    bodies = [json.dumps({"action": "echo", "n": n}).encode() for n in range(4)]
    ids = [f"pipelined-{n}" for n in range(4)]
    raw.send(
        b"".join(
            post("/predictions/swiss", b, JSON, f"X-Request-Id: {i}")
            for b, i in zip(bodies, ids, strict=True)
        )
    )
    replies = [raw.reply() for _ in bodies]
    assert [r.headers["x-request-id"] for r in replies] == ids
    assert [r.json()["values"]["body"]["n"] for r in replies] == [0, 1, 2, 3]  # type: ignore[index]


def test_chunked_request_body(raw: Raw) -> None:
    body = json.dumps({"action": "echo", "pad": "z" * 300}).encode()
    pieces = [body[:7], body[7:200], body[200:]]
    chunked = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-T: 1\r\n\r\n"
    raw.send(
        b"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + JSON.encode()
        + b"\r\n\r\n"
        + chunked
    )
    reply = raw.reply()
    assert reply.status == 200, reply.body
    assert reply.json()["values"]["body"]["pad"] == "z" * 300  # type: ignore[index]


def test_expect_100_continue(raw: Raw) -> None:
    head = f"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nContent-Length: {len(ECHO)}\r\n"
    raw.send(f"{head}{JSON}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert raw.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert raw.reader.readline() == b"\r\n"
    raw.send(ECHO)
    assert raw.reply().status == 200


def test_expect_100_continue_refused_before_the_body(raw: Raw) -> None:
    size = 6553500 + 1
    head = f"POST /predictions/swiss HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
    raw.send(f"{head}Content-Type: text/plain\r\nExpect: 100-continue\r\n\r\n".encode())
    reply = raw.reply()  # the final answer, no 100 Continue before it
    assert reply.status == 413 and reply.headers["connection"] == "close"
    assert raw.at_eof()  # the body was never wanted: nothing left to read on this connection


def test_http_1_0_closes_unless_asked_to_keep_alive(server: Server) -> None:
    client = Raw(server)
    client.send(
        post("/predictions/swiss", ECHO, JSON, "Connection: keep-alive", version="HTTP/1.0")
    )
    reply = client.reply()
    assert reply.status == 200 and reply.headers["connection"] == "keep-alive"
    client.send(post("/predictions/swiss", ECHO, JSON, version="HTTP/1.0"))
    reply = client.reply()
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert client.at_eof()
    client.close()


def test_head_gets_no_body_and_the_connection_goes_on(raw: Raw) -> None:
    raw.send(b"HEAD /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = raw.reply(head_only=True)
    assert reply.status == 405 and int(reply.headers["content-length"]) > 0
    raw.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # parsed right after the head alone
    reply = raw.reply()
    assert reply.status == 200 and reply.json() == {"status": "Healthy"}


def test_connection_close_is_honoured(raw: Raw) -> None:
    raw.send(post("/ping", b"", "Connection: close").replace(b"POST", b"GET", 1))
    reply = raw.reply()
    assert reply.status == 200 and reply.json() == {"status": "Healthy"}
    assert reply.headers["connection"] == "close"
    assert raw.at_eof()


@pytest.mark.parametrize(
    ("request_bytes", "status", "needle"),
    [
        (b"POST /predictions/swiss\r\nHost: x\r\n\r\n", 400, "request line"),
        (b"GET /ping HTTP/2.0\r\nHost: x\r\n\r\n", 400, "request line"),
        (b"GET /ping HTTP/1.1\r\nno colon here\r\n\r\n", 400, "Invalid header token"),
        (b"GET /ping HTTP/1.1\r\n continued\r\n\r\n", 400, "Unexpected space"),
        (b"POST /predictions/swiss HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "Content-Length"),
        (
            b"POST /predictions/swiss HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
            400,
            "Content-Length",
        ),
        (
            b"POST /predictions/swiss HTTP/1.1\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "can't be present with Content-Length",
        ),
        (b"POST /predictions/swiss HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "gzip"),
        (
            b"POST /predictions/swiss HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "chunk size",
        ),
        (
            b"POST /predictions/swiss HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd",
            400,
            "after chunk data",
        ),
        (b"GET /ping HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "64 KiB"),
        (
            "POST /predictions/swiss HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode(),
            400,
            "Content-Length",
        ),
        (
            b"POST /predictions/swiss HTTP/1.1\r\nContent-Length: \r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "Empty Content-Length",
        ),
        (b"GET /ping HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n", 400, "Missing expected CR"),
        (b"GET /ping HTTP/1.1\r\nX-A: 1\x002\r\n\r\n", 400, "header value char"),
        # the target is written to access_log.log: no forged lines, no terminal escapes
        (b'GET /ping\r\n127.0.0.1 "GET /forged HTTP/1.1" 200\r\n\r\n', 400, "request"),
        (b"GET /ping\x1b[2J HTTP/1.1\r\n\r\n", 400, "url"),
        (b"GET /pi\x00ng HTTP/1.1\r\n\r\n", 400, "url"),
    ],
)
def test_broken_requests_get_an_error_and_a_closed_connection(
    server: Server, raw: Raw, request_bytes: bytes, status: int, needle: str
) -> None:
    raw.send(request_bytes)
    reply = raw.reply()
    assert reply.status == status, reply.body
    doc = reply.json()
    assert isinstance(doc, dict) and doc["code"] == status and needle in doc["message"], doc
    assert reply.headers["connection"] == "close"
    assert raw.at_eof()
    if request_bytes.partition(b"\r\n\r\n")[2]:  # refused mid-body: in the access log
        assert server.access_line(f'"POST /predictions/swiss HTTP/1.1" {status}')
    still_serving(server)


def test_repeated_identical_content_length_is_refused(raw: Raw) -> None:
    # RFC 9110 lets a server refuse it; TorchServe's Netty does, and llhttp does
    n = len(ECHO)
    head = f"POST /predictions/swiss HTTP/1.1\r\nContent-Length: {n}\r\nContent-Length: {n}\r\n"
    raw.send(f"{head}{JSON}\r\n\r\n".encode() + ECHO)
    reply = raw.reply()
    assert reply.status == 400 and "Duplicate Content-Length" in reply.json()["message"]  # type: ignore[index]
    assert raw.at_eof()


def test_a_body_over_the_limit_is_refused_and_the_connection_closed(raw: Raw) -> None:
    size = 6553500 + 10
    raw.send(post("/predictions/swiss", b"x" * size, "Content-Type: text/plain"))
    reply = raw.reply()  # the body was read and dropped meanwhile: the answer is not lost
    assert reply.status == 413 and reply.headers["connection"] == "close"
    assert "exceeds max_request_size" in reply.json()["message"]  # type: ignore[index]
    assert raw.at_eof()


def test_response_header_with_a_line_break_is_dropped(server: Server, raw: Raw) -> None:
    body = json.dumps({"action": "header", "name": "X-Evil", "value": "a\r\nSet-Cookie: x=1"})
    raw.send(post("/predictions/swiss", body.encode(), JSON))
    reply = raw.reply()
    assert reply.status == 200
    assert "x-evil" not in reply.headers and "set-cookie" not in reply.headers
    assert "x-request-id" in reply.headers
    ts_log = server.log_dir / "ts_log.log"
    server.wait_for(lambda: "dropped response header 'X-Evil'" in ts_log.read_text())


def test_unknown_path_on_the_predictions_tree_is_404(raw: Raw) -> None:
    raw.send(post("/predictions//1.0", ECHO, JSON))  # an extra path is a url_path
    reply = raw.reply()
    assert reply.status == 404
    assert reply.json()["type"] == "ResourceNotFoundException"  # type: ignore[index]


def test_a_client_that_half_closes_mid_body_loses_nothing_for_others(
    server: Server, raw: Raw
) -> None:
    raw.send(b"POST /predictions/swiss HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.at_eof()  # dropped without an answer: there was no whole request to answer
    still_serving(server)
