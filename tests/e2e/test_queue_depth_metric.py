"""`tsctl_queue_depth`, the metric an autoscaler scales tsctl on (deploy/kubernetes/hpa.yaml):
requests waiting per model version, read from the batching queues when the metrics API is
scraped. A real daemon, one worker held busy by a handler that waits for the test's go."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from tests.support.daemon import Response, Server, dedent
from tsctl.archive.writer import ArchiveSpec, plan_archive, write_archive

HELD_HANDLER = dedent(
    """
    import json
    import os
    import time


    def handle(data, context):
        if data is None:
            return None
        out = []
        for row in data:
            body = row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            gate = body.get("hold") if isinstance(body, dict) else None
            if gate:  # busy until the test creates the file `gate`
                open(gate + ".started", "w").close()
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
            out.append("done")
        return out
    """
)
WAITING = 3


def archive_held(store: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "held.py").write_text(HELD_HANDLER)
    spec = ArchiveSpec(
        model_name="held",
        handler=str(work / "held.py"),
        version="1.0",
        export_path=store,
        force=True,
    )
    store.mkdir(parents=True, exist_ok=True)
    write_archive(plan_archive(spec))


def series(text: str, model: str) -> list[str]:
    return re.findall(rf'^tsctl_queue_depth{{model_name="{model}",.*$', text, re.MULTILINE)


def test_queue_depth_counts_waiting_requests_and_drops_unregistered_models(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path, {"job_queue_size": 10, "default_workers_per_model": 1})
    archive_held(server.store, tmp_path / "src")
    server.start("held.mar", flags=("--enable-model-api",))
    answers: list[Response] = []
    senders: list[threading.Thread] = []

    def send(body: dict[str, str]) -> None:
        sender = threading.Thread(target=lambda: answers.append(server.predict("held", body)))
        sender.start()
        senders.append(sender)

    try:
        text = server.metrics_text()
        assert "# TYPE tsctl_queue_depth gauge" in text
        assert series(text, "held") == [
            'tsctl_queue_depth{model_name="held",model_version="1.0",} 0.0'
        ]
        gate = tmp_path / "go"
        send({"hold": str(gate)})  # the one worker takes it and stays busy
        server.wait_for(lambda: Path(f"{gate}.started").exists())
        for _ in range(WAITING):
            send({})
        server.wait_for(lambda: server.queued("held") == WAITING)
        gate.touch()
        for sender in senders:
            sender.join(60)
        assert [a.status for a in answers] == [200] * (WAITING + 1)
        server.wait_for(lambda: server.queued("held") == 0)
        assert series(server.metrics_text(), "held")  # still listed, at 0
        # an unregistered model's series goes: a stale value would keep an autoscaler busy
        assert server.manage("DELETE", "/models/held/1.0").status == 200
        assert series(server.metrics_text(), "held") == []
    finally:
        server.stop()
