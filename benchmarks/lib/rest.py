"""One HTTP request at a time to a TorchServe-style REST API (tsctl's or TorchServe's), and how
many of a model's workers its management API reports READY."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    """One HTTP answer: status, reason phrase, lower-cased headers, body."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    address: str,
    method: str,
    path: str,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """Send one request to `address` (`http://host:port`) and read the whole answer."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request(method, path, body=data, headers=headers or {})
        reply = conn.getresponse()
        answer = reply.read()
        found = {k.lower(): v for k, v in reply.getheaders()}
        return Reply(reply.status, reply.reason, found, answer)
    finally:
        conn.close()


def ready_workers(management: str, model: str) -> int:
    """Workers the management API at `management` reports READY for `model` (0 if it cannot
    tell yet)."""
    try:
        reply = call(management, "GET", f"/models/{model}", timeout=5)
        if reply.status != 200:
            return 0
        workers = reply.json()[0].get("workers", [])
    except (OSError, http.client.HTTPException, ValueError, LookupError):
        return 0
    return sum(1 for worker in workers if worker.get("status") == "READY")


def batch_stats(metrics: str) -> tuple[float, float]:
    """(sum, count) of tsctl's `tsctl_batch_size` histogram over every model, from the metrics
    API at `metrics` (`http://host:port`); (0, 0) from a server without it (TorchServe)."""
    try:
        text = call(metrics, "GET", "/metrics", timeout=10).body.decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return 0.0, 0.0
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("tsctl_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tsctl_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count
