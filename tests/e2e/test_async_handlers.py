"""Async handlers (`asyncCommunication: true`): several batches in flight in one worker, each
answered on its own; real daemons, real workers. Concurrency is proved by requests that wait
for each other inside the handler (tests/fixtures/handlers/async_gather.py), never by time."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.daemon import Response, Server, make_archive

pytestmark = pytest.mark.slow

ASYNC = {"asyncCommunication": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    properties = {"enable_model_api": "true", "model_metrics_auto_detect": "true"}
    srv = Server(tmp_path_factory.mktemp("async"), properties=properties)
    make_archive(srv.store, "gather", "async_gather", config=ASYNC)
    make_archive(srv.store, "paired", "async_gather", config={**ASYNC, "batchSize": 2})
    make_archive(srv.store, "bounded", "async_gather", config={**ASYNC, "maxBatchesInFlight": 2})
    make_archive(srv.store, "victim", "async_gather", config=ASYNC)
    make_archive(srv.store, "slow", "async_gather", config={**ASYNC, "responseTimeout": 1})
    make_archive(srv.store, "recycled", "async_gather", config={**ASYNC, "recycleAfterRequests": 2})
    make_archive(srv.store, "function", "async_function", config=ASYNC)
    make_archive(srv.store, "returned", "async_returned", config=ASYNC)
    make_archive(srv.store, "returned_plain", "async_returned")
    srv.start(
        "gather.mar",
        "paired.mar",
        "bounded.mar",
        "victim.mar",
        "slow.mar",
        "recycled.mar",
        "function.mar",
        "returned.mar",
        "returned_plain.mar",
    )
    yield srv
    result = srv.stop()
    assert result.returncode == 0, result.stderr


def at_once(server: Server, model: str, bodies: list[dict[str, Any]]) -> list[Response]:
    """Send every body at once, each on its own connection; the answers in the same order."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: server.predict(model, body, timeout=60), bodies))


def worker_pids(server: Server, model: str) -> list[int]:
    described = server.manage("GET", f"/models/{model}").json()[0]["workers"]
    return [w["pid"] for w in described]


def test_requests_wait_for_each_other_in_one_worker(server: Server) -> None:
    # each request is answered only once all six are inside the handler together
    bodies = [{"gather": "six", "size": 6, "value": i} for i in range(6)]
    answers = at_once(server, "gather", bodies)
    assert [a.status for a in answers] == [200] * 6, [a.body for a in answers]
    results = [a.json() for a in answers]
    assert [r["value"] for r in results] == list(range(6))  # each its own answer
    assert len({r["pid"] for r in results}) == 1 and results[0]["peak"] >= 6
    # each batch kept its own context while the others ran (TorchServe copies it per batch)
    assert len({r["request_id"] for r in results}) == 6


def test_each_batchs_metrics_go_with_its_own_request(server: Server) -> None:
    bodies = [{"gather": "metered", "size": 4, "value": 100 + i, "metric": True} for i in range(4)]
    answers = at_once(server, "gather", bodies)
    ids = {a.json()["value"]: a.json()["request_id"] for a in answers}
    metrics = server.log_dir / "model_metrics.log"

    def logged() -> list[str]:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [line for line in lines if "Gathered.count:" in line]

    server.wait_for(lambda: len(logged()) == 4)
    for line in logged():  # each value under the request that recorded it, none under another
        value = int(float(line.split("Gathered.count:")[1].split("|")[0]))
        assert f"requestID:{ids[value]}," in line, (line, ids)


def test_batches_form_and_are_in_flight_together(server: Server) -> None:
    bodies = [{"gather": "pairs", "size": 6, "value": i} for i in range(6)]
    answers = at_once(server, "paired", bodies)
    assert [a.json()["value"] for a in answers] == list(range(6))


def test_in_flight_batches_are_bounded_per_worker(server: Server) -> None:
    bodies = [{"gather": "two", "size": 2, "value": i} for i in range(6)]
    answers = at_once(server, "bounded", bodies)
    assert [a.json()["value"] for a in answers] == list(range(6))
    assert {a.json()["peak"] for a in answers} <= {2}  # never more than maxBatchesInFlight


@pytest.mark.daemon_errors(r"ValueError: on purpose")
def test_a_failing_request_fails_alone(server: Server) -> None:
    bodies: list[dict[str, Any]] = [{"gather": "beside", "size": 2, "value": i} for i in range(2)]
    answers = at_once(server, "gather", [*bodies, {"fail": "on purpose"}])
    assert [a.status for a in answers] == [200, 200, 503]
    assert answers[2].json()["message"] == "Prediction failed"
    assert [a.json()["value"] for a in answers[:2]] == [0, 1]


def test_intermediate_answers_stream(server: Server) -> None:
    streamed = server.predict("gather", {"stream": 3})
    assert streamed.status == 200
    assert streamed.headers.get("transfer-encoding") == "chunked"
    assert streamed.body == b"part0 part1 part2 done"


def test_an_async_function_handler_and_a_returned_coroutine(server: Server) -> None:
    for model in ("function", "returned"):
        answer = server.predict(model, {"x": 1})
        assert answer.status == 200 and answer.json() == {"async": True}, answer.body


def test_a_returned_coroutine_without_the_setting_is_a_configuration_error(
    server: Server,
) -> None:
    answer = server.predict("returned_plain", {"x": 1})
    assert answer.status == 500, answer.body
    message = answer.json()["message"]
    assert "asyncCommunication: true" in message and "model-config.yaml" in message
    assert "coroutine" not in message


@pytest.mark.daemon_errors(r"asyncCommunication: true")
@pytest.mark.parametrize("handler", ["async_function", "async_gather"])
def test_an_async_def_handler_without_the_setting_is_refused_at_registration(
    server: Server, handler: str
) -> None:
    make_archive(server.store, f"plain_{handler}", handler)
    url = f"/models?url=plain_{handler}.mar&initial_workers=1&synchronous=true"
    refused = server.manage("POST", url)
    assert refused.status == 500, refused.body
    message = refused.json()["message"]
    assert "is asynchronous (async def)" in message
    assert "'asyncCommunication: true' in the model's model-config.yaml" in message


@pytest.mark.daemon_errors(r"died|killed", required=False)
def test_a_worker_killed_with_batches_in_flight_answers_them_all(server: Server) -> None:
    [pid] = worker_pids(server, "victim")
    with ThreadPoolExecutor(3) as pool:
        waiting = [
            pool.submit(server.predict, "victim", {"wait": "never", "value": i}, timeout=60)
            for i in range(3)
        ]
        # asked while the three wait in the handler: a fourth batch in flight beside them
        server.wait_for(
            lambda: server.predict("victim", {"waiting": "never"}).json()["waiting"] == 3
        )
        os.kill(pid, signal.SIGKILL)
        answers = [future.result() for future in waiting]
    for answer in answers:
        assert answer.status == 500, answer.body
        assert "died" in answer.json()["message"]
    server.wait_for(lambda: worker_pids(server, "victim") not in ([], [pid]))
    assert server.predict("victim", {"x": 1}).status == 200


@pytest.mark.daemon_errors(r"overran the response timeout", r"died|killed", required=False)
def test_a_batch_past_the_response_timeout_is_answered_and_its_worker_replaced(
    server: Server,
) -> None:
    [pid] = worker_pids(server, "slow")
    stuck = server.predict("slow", {"wait": "never", "value": 0})
    assert stuck.status == 500, stuck.body
    assert "response timeout" in stuck.json()["message"]
    server.wait_for(lambda: worker_pids(server, "slow") not in ([], [pid]))
    assert server.predict("slow", {"x": 1}).status == 200


def test_an_async_worker_is_recycled_after_its_requests(server: Server) -> None:
    [first] = worker_pids(server, "recycled")
    for _ in range(2):
        assert server.predict("recycled", {"x": 1}).json()["pid"] == first
    server.wait_for(lambda: first not in worker_pids(server, "recycled"))  # successor first
    assert server.predict("recycled", {"x": 1}).json()["pid"] != first


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            {"sequenceBatching": True, "sequenceMaxIdleMSec": 1000, "continuousBatching": True},
            "asyncCommunication and continuousBatching",
        ),
        ({"parallelType": "tp", "parallelLevel": 2}, "asyncCommunication cannot be used with"),
    ],
    ids=["continuous", "torchrun"],
)
def test_what_an_async_worker_cannot_run_is_refused_at_registration(
    server: Server, extra: dict[str, Any], named: str
) -> None:
    name = f"refused_{next(iter(extra))}"
    make_archive(server.store, name, "async_gather", config={**ASYNC, **extra})
    refused = server.manage("POST", f"/models?url={name}.mar&initial_workers=1&synchronous=true")
    assert refused.status == 400, refused.body
    assert named in refused.json()["message"]
    assert server.manage("GET", f"/models/{name}").status == 404
