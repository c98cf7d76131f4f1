"""The drain on SIGTERM, as a client on the inference port sees it: the daemon stops
accepting, closes its idle keep-alive connections at once (cleanly, before any byte of a next
request is read), answers the requests it holds with `Connection: close` and closes their
connections after the answer, then exits.

Why: a client or proxy (nginx, a Kubernetes Service) holds keep-alive connections to a replica
that is stopping. An idle one closed at once is seen closed before the next request is sent on
it, and that request goes to a replica that serves; an open one would take the request and
answer it 503 ("shutting down"), which only a proxy that retries on 503 hides. A request in
progress is answered (the drain), and `Connection: close` on its answer keeps its client from
sending another on that connection. tests/reliability/test_replicas.py shows the same behind
nginx under load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import reliability as rel
from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

WAIT = 30.0


def gated(root: Path) -> tuple[bytes, Path, Path]:
    """A prediction the `gate` handler holds until the gate file exists."""
    entered, gate = root / "entered", root / "gate"
    body = json.dumps({"entered": str(entered), "gate": str(gate)}).encode()
    return rel.post("/predictions/gate", body), entered, gate


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_exit(pid: int) -> None:
    deadline = time.monotonic() + WAIT
    while rel.alive(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit in time"
        time.sleep(0.02)


def test_drain_closes_idle_connections_and_answers_with_connection_close(
    tmp_path: Path,
) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "gate", "gate")
    srv.start("gate.mar")
    assert srv.info is not None
    pid = srv.info.pid
    request, entered, gate = gated(tmp_path)
    idle = rel.Connection(srv.inference, timeout=WAIT)
    busy = rel.Connection(srv.inference, timeout=WAIT)
    answer: list[bytes] = []
    try:
        status, headers, _ = idle.request(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and headers.get("connection", "") != "close"
        busy.sock.sendall(request)
        srv.wait_for(entered.exists)  # the request is in the handler, held by the gate

        os.kill(pid, signal.SIGTERM)
        # the idle connection is closed while the drain still waits on the held request
        # (the gate is shut: nothing else could end it): a clean end, no reset, no answer
        assert idle.sock.recv(1024) == b""
        with pytest.raises(ConnectionRefusedError):  # and nothing new is accepted
            socket.create_connection(rel.host_port(srv.inference), timeout=WAIT).close()

        reader = threading.Thread(target=lambda: answer.append(read_to_end(busy.sock)))
        reader.start()
        gate.write_text("open")
        reader.join(WAIT)
        assert answer, "the held request was not answered"
        head, _, body = answer[0].partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 200 "), answer[0]
        # no next request on this connection; then closed after the answer (the end of
        # `read_to_end`), with the whole answer before the end
        assert "connection: close" in [line.lower() for line in lines[1:]]
        assert json.loads(body)["pid"] > 0
        wait_exit(pid)
    finally:
        gate.write_text("open")
        idle.close()
        busy.close()
        if rel.alive(pid):
            os.kill(pid, signal.SIGKILL)
