"""Batching strategies through a real daemon: the priority example (examples/plugins/
priority_batching, installed with its entry points), a model-config.yaml that names an unknown
strategy or bad options, and a strategy that raises.

Latency is counted in batches, never in seconds: the `batch_log` handler numbers its batches
and lists each batch's requests, and a client notes, as it sends a request, the newest batch it
has seen answered; the batches a request waited are those between that one and its own.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.support.daemon import Server, dedent, make_archive
from tests.support.plugins import install_example, write_plugin

pytestmark = pytest.mark.slow

BATCH = 4
MAX_LOW = 2
WORK = 0.1  # seconds the handler takes per batch
LOW_CLIENTS = 24  # closed-loop clients, each always with one request out: the model saturates
HIGHS = 6

PRIORITY = {
    "batchSize": BATCH,
    "maxBatchDelay": 50,
    "batchingStrategy": "priority",
    "batchingOptions": {"max_low_per_batch": MAX_LOW, "default_class": "low"},
}

BOOM = dedent(
    """
    from tsctl.plugins import BatchingStrategy
    from tsctl.server.batching import next_batch


    class Boom(BatchingStrategy):
        name = "boom"

        async def next_batch(self, queue, batch_size, max_delay_ms, worker):
            batch = await next_batch(queue, batch_size, max_delay_ms, worker)
            if any(n.lower() == "x-boom" for job in batch for n, _ in job.request.headers):
                raise RuntimeError("boom from the strategy")
            return batch


    PLUGINS = [Boom]
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("plugin_batching")
    site = install_example("priority_batching", root / "site")
    write_plugin(root / "plugins", "boom", BOOM)
    srv = Server(root, properties={"enable_model_api": "true"})
    make_archive(srv.store, "prio", "batch_log", config=PRIORITY)
    make_archive(srv.store, "boom", "swiss", config={"batchingStrategy": "boom"})
    make_archive(srv.store, "nope", "swiss", config={"batchingStrategy": "nope"})
    for name, options in [("zero", {"max_low_per_batch": 0}), ("colour", {"colour": "red"})]:
        make_archive(srv.store, name, "swiss", config={**PRIORITY, "batchingOptions": options})
    # the default strategy takes no options
    make_archive(srv.store, "plain", "swiss", config={"batchingOptions": {"max_low_per_batch": 2}})
    srv.start(
        "prio.mar",
        "boom.mar",
        flags=("--plugins-path", str(root / "plugins")),
        env={"PYTHONPATH": str(site)},
    )
    yield srv
    srv.stop()


@dataclass
class Sent:
    tag: str
    high: bool
    seen: int  # the newest batch any client had seen answered when this one was sent
    order: int  # when it was sent, among all requests
    batch: int = 0  # the batch it ran in
    tags: tuple[str, ...] = ()  # that batch's requests, in the batch's order

    @property
    def waited(self) -> int:
        """Batches that ran between the newest one answered at sending and its own."""
        return self.batch - self.seen - 1


class Flood:
    """Closed-loop clients sending low-priority requests until `stop`; every request sent
    (low and high) is recorded with what was answered before it went out."""

    def __init__(self, server: Server) -> None:
        host, port = server.inference.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.lock = threading.Lock()
        self.seen = 0
        #: the newest batch answered once the flood had saturated the model (`saturate`)
        self.warm = 0
        self.sent: list[Sent] = []
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def note(self, tag: str, high: bool) -> Sent:
        with self.lock:
            record = Sent(tag, high, self.seen, len(self.sent))
            self.sent.append(record)
            return record

    def answered(self, record: Sent, answer: dict[str, Any]) -> None:
        with self.lock:
            record.batch, record.tags = answer["batch"], tuple(answer["tags"])
            self.seen = max(self.seen, record.batch)

    def post(self, conn: http.client.HTTPConnection, tag: str, headers: dict[str, str]) -> None:
        record = self.note(tag, high=tag.startswith("high"))
        body = json.dumps({"tag": tag, "seconds": WORK})
        headers = {"Content-Type": "application/json", **headers}
        conn.request("POST", "/predictions/prio", body, headers)
        reply = conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            self.errors.append(f"{tag}: {reply.status} {data[:200]!r}")
            return
        self.answered(record, json.loads(data))

    def low_client(self, number: int) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=60)
        # half say so, half leave it to the option default_class: low
        headers = {"X-Priority": "low"} if number % 2 else {}
        try:
            for count in range(10_000):
                if self.stopping.is_set():
                    return
                self.post(conn, f"low-{number}-{count}", headers)
        finally:
            conn.close()

    def wait_for_batches(self, count: int, server: Server) -> None:
        """Until `count` more batches are answered (counted from the first answer seen)."""
        server.wait_for(lambda: self.seen > 0 or bool(self.errors))
        target = self.seen + count
        server.wait_for(lambda: self.seen >= target or bool(self.errors))

    def saturate(self, server: Server) -> list[threading.Thread]:
        """Start the low clients; return once every one has had a request out for a while."""
        threads = [threading.Thread(target=self.low_client, args=(n,)) for n in range(LOW_CLIENTS)]
        for thread in threads:
            thread.start()
        self.wait_for_batches(3, server)
        self.warm = self.seen
        return threads

    def stop(self, threads: list[threading.Thread]) -> None:
        self.stopping.set()
        for thread in threads:
            thread.join()
        assert self.errors == []

    def overtaken(self, high: Sent) -> list[Sent]:
        """The low requests sent before `high` that ran in a later batch."""
        return [
            r for r in self.sent if not r.high and r.order < high.order and r.batch > high.batch
        ]


def test_high_priority_jumps_a_flood_of_low_priority(server: Server) -> None:
    flood = Flood(server)
    threads = flood.saturate(server)
    try:
        conn = http.client.HTTPConnection(*flood.address, timeout=60)
        for number in range(HIGHS):
            # the header's name and value in any case (REST keeps the client's spelling)
            name, value = ("X-Priority", "high") if number % 2 else ("x-priority", "HIGH")
            flood.post(conn, f"high-{number}", {name: value})
            flood.wait_for_batches(2, server)
        conn.close()
    finally:
        flood.stop(threads)
    highs = [r for r in flood.sent if r.high]
    lows = [r for r in flood.sent if not r.high and r.batch]
    assert len(highs) == HIGHS and all(r.batch for r in highs)

    # each high request ran within a few batches of being sent (the one running, the one
    # collected as it arrived, and as many as the clients' view of answers lags) ...
    assert max(r.waited for r in highs) <= 3, [(r.tag, r.waited) for r in highs]
    # ... while the low ones, two per batch behind ~20 others, waited about 11
    saturated = [r for r in lows if r.seen >= flood.warm]
    assert statistics.median(r.waited for r in saturated) >= 8
    for high in highs:
        # it was answered before many low requests that had been queued before it
        assert len(flood.overtaken(high)) >= 8, (high.tag, len(flood.overtaken(high)))
        assert high.tag in high.tags  # the handler's record agrees with the answer

    batches = {r.batch: r.tags for r in flood.sent if r.batch}
    low_counts = [sum(t.startswith("low") for t in tags) for tags in batches.values()]
    assert max(low_counts) == MAX_LOW  # the cap is reached, never passed
    assert max(len(tags) for tags in batches.values()) <= BATCH


def test_grpc_metadata_sets_the_priority(server: Server, ts_protos: dict[str, ModuleType]) -> None:
    assert server.info is not None
    channel = grpc.insecure_channel(server.info.grpc_inference_address)
    stub = ts_protos["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
    flood = Flood(server)
    threads = flood.saturate(server)
    try:
        record = flood.note("high-grpc", high=True)
        body = json.dumps({"tag": "high-grpc", "seconds": WORK}).encode()
        request = ts_protos["inference_pb2"].PredictionsRequest(
            model_name="prio", input={"body": body}
        )
        answer = stub.Predictions(request, metadata=[("x-priority", "high")], timeout=60)
        flood.answered(record, json.loads(answer.prediction))
    finally:
        channel.close()
        flood.stop(threads)
    assert record.waited <= 3 and "high-grpc" in record.tags
    assert len(flood.overtaken(record)) >= 8


def register(server: Server, archive: str) -> Any:
    return server.manage("POST", f"/models?url={archive}&initial_workers=1&synchronous=true")


def test_an_unknown_strategy_refuses_the_registration(
    server: Server, ts_protos: dict[str, ModuleType]
) -> None:
    answer = register(server, "nope.mar")
    assert answer.status == 400
    message = answer.json()["message"]
    assert "'nope'" in message and "model nope" in message
    assert "priority" in message and "Traceback" not in message
    assert server.manage("GET", "/models/nope").status == 404

    assert server.info is not None
    channel = grpc.insecure_channel(server.info.grpc_management_address)
    manage = ts_protos["management_pb2_grpc"].ManagementAPIsServiceStub(channel)
    request = ts_protos["management_pb2"].RegisterModelRequest(url="nope.mar", synchronous=True)
    with pytest.raises(grpc.RpcError) as caught:
        manage.RegisterModel(request, timeout=60)
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope'" in caught.value.details()


@pytest.mark.parametrize(
    ("archive", "named"),
    [("zero.mar", "max_low_per_batch"), ("colour.mar", "'colour'"), ("plain.mar", "max_low")],
)
def test_options_the_strategy_refuses_refuse_the_registration(
    server: Server, archive: str, named: str
) -> None:
    answer = register(server, archive)
    assert answer.status == 400
    message = answer.json()["message"]
    assert named in message and "batchingOptions" in message
    assert "Traceback" not in message


@pytest.mark.daemon_errors("batching strategy boom failed in next_batch")
def test_a_strategy_that_raises_fails_its_batch_not_its_worker(server: Server) -> None:
    before = server.predict("boom", {"action": "echo"})
    assert before.status == 200
    answer = server.predict("boom", {"action": "echo"}, headers={"X-Boom": "1"})
    assert answer.status == 500
    message = answer.json()["message"]
    assert "batching strategy failed" in message and "boom from" not in message
    after = server.predict("boom", {"action": "echo"})
    assert after.status == 200
    assert after.json()["pid"] == before.json()["pid"]  # the same worker serves on
    log = (server.log_dir / "ts_log.log").read_text()
    assert "batching strategy boom failed in next_batch for model boom" in log
    assert "RuntimeError: boom from the strategy" in log


@pytest.mark.daemon_errors("start-up failed")
def test_an_unknown_strategy_stops_a_start_with_models(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_archive(srv.store, "nope", "swiss", config={"batchingStrategy": "nope"})
    result = srv.start("nope.mar", expect_ok=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "model nope: batchingStrategy 'nope' is not a loaded batching strategy" in output
    assert "Traceback" not in output
