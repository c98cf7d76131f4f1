"""One error funnel per surface: each error class through the REST inference and management
APIs, the gRPC inference and management APIs and the CLI, caused for real against one daemon
(token authorization on); then a bug (not a `TsctlError`) through each, in-process, which must
answer 500 / INTERNAL / one generic line with a request id, and never the exception's class or
text, while the server log gets the traceback."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import grpc
import pytest

from tests.e2e.test_serve import assert_error
from tests.support.cli import run_tsctl
from tests.support.daemon import Server, make_archive

LIMIT = 1_000_000  # max_request_size
FAILED = "Token Authorization failed"
SECRET = "secret-detail-xyz"
RAISE = json.dumps({"action": "raise"}).encode()
SLEEP = json.dumps({"action": "sleep", "seconds": 30}).encode()
JSON = {"Content-Type": "application/json"}
INF, MAN = "inference", "management"
BIG = b"x" * (LIMIT + 1)
BOOM = pytest.mark.daemon_errors("boom from handler")
#: what the daemon logs when a handler overruns its response timeout (its worker is replaced)
OVERRAN = pytest.mark.daemon_errors("overran the response timeout")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("funnel"),
        properties={"enable_model_api": "true", "job_queue_size": 1, "max_request_size": LIMIT},
    )
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "slow", "swiss", config={"responseTimeout": 1})
    make_archive(srv.store, "busy", "swiss")
    make_archive(srv.store, "idle", "swiss")
    srv.start("swiss.mar", "slow.mar", "busy.mar", auth=True)
    idle = srv.manage("POST", "/models?url=idle.mar&initial_workers=0", headers=auth(srv, MAN))
    assert idle.status == 200, idle.body
    yield srv
    srv.stop()


def auth(server: Server, api: str) -> dict[str, str]:
    """The Authorization header for `api`, with its key from the daemon's key file."""
    keys = json.loads((server.root / "key_file.json").read_text())
    return {"Authorization": f"Bearer {keys[api]['key']}"}


# --- REST and gRPC: one row per error class a surface can produce, each caused for real


class Rest(NamedTuple):
    api: str
    call: str  # "METHOD /path"
    status: int
    kind: str  # the type's name without "Exception"
    needle: str = ""
    body: bytes = b"{}"
    ctype: str = "application/json"
    token: bool = True


class Rpc(NamedTuple):
    api: str
    method: str
    build: Callable[[Any], Any]  # makes the request from the API's `_pb2` module
    code: str
    needle: str = ""
    token: bool = True


def rest(name: str, *args: Any, marks: Any = (), **kw: Any) -> Any:
    """A `Rest` case named "api-name" (the error class)."""
    return pytest.param(Rest(*args, **kw), id=f"{args[0]}-{name}", marks=marks)


def rpc(name: str, *args: Any, marks: Any = (), **kw: Any) -> Any:
    return pytest.param(Rpc(*args, **kw), id=f"{args[0]}-{name}", marks=marks)


REST = [
    rest("ModelNotFound", INF, "POST /predictions/nope", 404, "ModelNotFound", "nope"),
    rest("NotFound", INF, "GET /nothing", 404, "ResourceNotFound", "not found"),
    rest("BadRequest", INF, "POST /predictions/swiss", 400, "BadRequest", "multipart",
         body=b"x", ctype="multipart/form-data"),
    rest("MethodNotAllowed", INF, "OPTIONS /predictions/swiss", 405, "MethodNotAllowed",
         "not allowed"),
    rest("RequestTooLarge", INF, "POST /predictions/swiss", 413, "RequestEntityTooLarge",
         "max_request_size", body=BIG, ctype="text/plain"),
    rest("ServiceUnavailable", INF, "POST /predictions/idle", 503, "ServiceUnavailable",
         "no worker"),
    rest("PredictionFailed", INF, "POST /predictions/swiss", 503, "InternalServer",
         "Prediction failed", body=RAISE, marks=BOOM),
    rest("InferenceTimeout", INF, "POST /predictions/slow", 500, "InternalServer",
         "response timeout", body=SLEEP, marks=OVERRAN),
    rest("Unauthorized", INF, "POST /predictions/swiss", 400, "InvalidKey", FAILED, token=False),
    rest("ModelNotFound", MAN, "GET /models/nope", 404, "ModelNotFound", "nope"),
    rest("NotFound", MAN, "GET /nothing", 404, "ResourceNotFound", "not found"),
    rest("BadRequest", MAN, "PUT /models/swiss?min_worker=-1", 400, "BadRequest", "min_worker"),
    rest("MethodNotAllowed", MAN, "DELETE /models", 405, "MethodNotAllowed", "not allowed"),
    rest("Conflict", MAN, "POST /models?url=swiss.mar", 409, "ConflictStatus", "swiss"),
    rest("RequestTooLarge", MAN, "POST /models", 413, "RequestEntityTooLarge",
         "max_request_size", body=BIG),
    rest("Unauthorized", MAN, "GET /models", 400, "InvalidKey", FAILED, token=False),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", REST)
def test_rest(server: Server, case: Rest) -> None:
    headers = {"Content-Type": case.ctype, "x-request-id": "funnel-1"}
    if case.token:
        headers.update(auth(server, case.api))
    method, path = case.call.split(" ")
    response = server.request(method, path, case.body, headers, api=case.api)
    assert_error(response, case.status, f"{case.kind}Exception", case.needle)
    assert response.headers["x-request-id"] == "funnel-1"


def _predict(model: str, body: bytes = b"x", **kw: Any) -> Callable[[Any], Any]:
    return lambda pb: pb.PredictionsRequest(model_name=model, input={"body": body}, **kw)


GRPC = [
    rpc("ModelNotFound", INF, "Predictions", _predict("nope"), "NOT_FOUND", "not found: nope"),
    rpc("ModelVersionNotFound", INF, "Predictions", _predict("swiss", model_version="9.9"),
        "NOT_FOUND", "9.9"),
    rpc("ModelNotFound-stream", INF, "StreamPredictions", _predict("nope"), "NOT_FOUND", "nope"),
    rpc("RequestTooLarge", INF, "Predictions", _predict("swiss", BIG), "RESOURCE_EXHAUSTED"),
    rpc("ServiceUnavailable", INF, "Predictions", _predict("idle"), "UNAVAILABLE", "no worker"),
    rpc("PredictionFailed", INF, "Predictions", _predict("swiss", RAISE), "UNAVAILABLE",
        "Prediction failed", marks=BOOM),
    rpc("InferenceTimeout", INF, "Predictions", _predict("slow", SLEEP), "DEADLINE_EXCEEDED",
        "response timeout", marks=OVERRAN),
    rpc("Unauthorized", INF, "Predictions", _predict("swiss"), "UNAUTHENTICATED", FAILED,
        token=False),
    rpc("ModelNotFound", MAN, "DescribeModel", lambda pb: pb.DescribeModelRequest(model_name="x"),
        "NOT_FOUND", "x"),
    rpc("InvalidInput", MAN, "ScaleWorker",
        # (min_worker -1 is "not given" in gRPC, as in TorchServe: proto3 has no unset int)
        lambda pb: pb.ScaleWorkerRequest(model_name="swiss", min_worker=3, max_worker=1),
        "INVALID_ARGUMENT", "max_worker cannot be less than min_worker"),
    rpc("Conflict", MAN, "RegisterModel", lambda pb: pb.RegisterModelRequest(url="swiss.mar"),
        "ALREADY_EXISTS", "swiss"),
    rpc("Unauthorized", MAN, "ListModels", lambda pb: pb.ListModelsRequest(), "UNAUTHENTICATED",
        FAILED, token=False),
]  # fmt: skip


def grpc_call(
    server: Server, protos: dict[str, ModuleType], case: Rpc, request: Any
) -> grpc.RpcError:
    """Make the call (reading a streamed answer to its end); the error it ends with."""
    assert server.info is not None
    address = getattr(server.info, f"grpc_{case.api}_address")
    meta = (("authorization", auth(server, case.api)["Authorization"]),) if case.token else ()
    stub_class = "InferenceAPIsServiceStub" if case.api == INF else "ManagementAPIsServiceStub"
    with grpc.insecure_channel(address) as channel:
        stub = getattr(protos[f"{case.api}_pb2_grpc"], stub_class)(channel)
        with pytest.raises(grpc.RpcError) as caught:
            answer = getattr(stub, case.method)(request, timeout=60, metadata=meta)
            if case.method == "StreamPredictions":
                list(answer)
    return caught.value


@pytest.mark.slow
@pytest.mark.parametrize("case", GRPC)
def test_grpc(server: Server, ts_protos: dict[str, ModuleType], case: Rpc) -> None:
    error = grpc_call(server, ts_protos, case, case.build(ts_protos[f"{case.api}_pb2"]))
    assert error.code() == grpc.StatusCode[case.code], (error.code(), error.details())
    assert case.needle in error.details()


@pytest.mark.slow
def test_queue_full_over_rest_and_grpc(server: Server, ts_protos: dict[str, ModuleType]) -> None:
    marker = server.root / "busy-marker"
    busy_body = {"action": "sleep", "seconds": 3, "marker": str(marker)}
    statuses: list[int] = []

    def call(body: dict[str, Any]) -> None:
        statuses.append(server.predict("busy", body, headers=auth(server, INF)).status)

    threads = [threading.Thread(target=call, args=(busy_body,))]
    threads[0].start()
    server.wait_for(marker.exists)  # the worker is busy: the next request fills the queue (1)
    threads.append(threading.Thread(target=call, args=({"action": "echo"},)))
    threads[1].start()
    server.wait_for(lambda: server.queued("busy") == 1)
    try:
        response = server.predict("busy", {}, headers=auth(server, INF))
        assert_error(response, 503, "ServiceUnavailableException", "queue is full")
        assert response.headers["retry-after"] == "1"
        case = Rpc(INF, "Predictions", _predict("busy"), "RESOURCE_EXHAUSTED")
        error = grpc_call(server, ts_protos, case, case.build(ts_protos["inference_pb2"]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in error.details()
    finally:
        for thread in threads:
            thread.join()
    assert statuses == [200, 200]


# --- CLI: the real command in a subprocess, against the daemon (its key found on its own)


def one_error_line(result: Any, code: int, needle: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsctl: error: "), result.stderr
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["models", "describe", "nope"], 1, "nope"),
        (["models", "register", "swiss.mar"], 1, "swiss"),
        (["models", "scale", "swiss", "--min-workers", "-1"], 1, "min_worker"),
        (["infer", "swiss", "no-such-file.bin"], 2, "no-such-file.bin"),
        pytest.param(["infer", "swiss", "raise.json"], 1, "Prediction failed", marks=BOOM),
        (["models", "list", "--url", "http://127.0.0.1:9"], 1, "cannot reach"),
    ],
)
def test_cli(server: Server, args: list[str], code: int, needle: str) -> None:
    (server.root / "raise.json").write_bytes(RAISE)
    one_error_line(server.tsctl(*args), code, needle)


@pytest.mark.slow
def test_cli_without_the_key_is_refused(server: Server, tmp_path: Path) -> None:
    # no pid file in this state dir: the CLI does not find the daemon's key
    result = run_tsctl(
        "models", "list", "--url", server.management, env={"TSCTL_STATE_DIR": str(tmp_path)}
    )
    one_error_line(result, 1, FAILED)


# --- a bug: the daemon's own adapters in one process, with `authorize` raising. In a
# subprocess: tsctl's generated protos (the servers') and TorchServe's (`ts_protos`, the
# clients' in this session) hold the same message names, and one process cannot load both.


def bugged_state(tmp_path: Path) -> Any:
    """A real, empty `ServerState` whose one authorization check (every API calls it first)
    raises what no client can cause: an exception that is not a `TsctlError`."""
    from tsctl.server.config import ServerConfig
    from tsctl.server.registry import Registry
    from tsctl.server.state import ServerState
    from tsctl.server.telemetry.logs import LineLog
    from tsctl.server.telemetry.metric_log import MetricLog
    from tsctl.server.telemetry.prometheus import Metrics

    config = ServerConfig(log_dir=tmp_path, state_dir=tmp_path)
    metrics = Metrics()
    registry = Registry(config, metrics, work_dir=tmp_path / "work")
    state = ServerState(
        config, registry, metrics, MetricLog(tmp_path), LineLog(tmp_path / "access_log.log")
    )

    def authorize(request: Any) -> None:
        raise RuntimeError(SECRET)

    state.authorize = authorize  # type: ignore[method-assign]
    state.authorizers = ("bug",)  # the adapters ask `authorize` only when there are some
    return state


def http_call(port: int, method: str, path: str) -> list[Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, b"{}", {"x-request-id": "bug-rest", **JSON})
        reply = conn.getresponse()
        return [reply.status, reply.getheader("x-request-id"), json.loads(reply.read())]
    finally:
        conn.close()


async def rpc_error(call: Callable[[], Any]) -> list[Any]:
    """The status, details and trailing metadata a call (a stream, read to its end) fails with."""
    try:
        answer = call()
        if hasattr(answer, "__aiter__"):
            async for _ in answer:
                pass
        else:
            await answer
    except grpc.aio.AioRpcError as exc:
        return [exc.code().name, exc.details(), [list(m) for m in exc.trailing_metadata() or ()]]
    raise AssertionError("the call did not fail")


async def exercise(state: Any) -> dict[str, Any]:
    """Serve the four APIs on free ports, send each one request, stop them."""
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from tsctl.proto_gen import inference_pb2 as pb
    from tsctl.proto_gen import inference_pb2_grpc, management_pb2, management_pb2_grpc
    from tsctl.server.api import grpc_api, rest_inference, rest_management

    (rest_sock, rest_port), (manage_sock, manage_port) = bind_unused_port(), bind_unused_port()
    inference = await rest_inference.serve(state, [rest_sock])
    management = HTTPServer(rest_management.make_app(state))
    management.add_sockets([manage_sock])
    grpc_inference, inference_address = await grpc_api.start(state, "127.0.0.1:0", "inference")
    grpc_management, management_address = await grpc_api.start(state, "127.0.0.1:0", "management")
    rest = [
        await asyncio.to_thread(http_call, rest_port, "POST", "/predictions/m"),
        await asyncio.to_thread(http_call, manage_port, "GET", "/models/m"),
    ]
    request = pb.PredictionsRequest(model_name="m", input={"body": b"x"})
    meta = (("x-request-id", "bug-grpc"),)
    async with grpc.aio.insecure_channel(inference_address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        rpc = [
            await rpc_error(lambda: stub.Predictions(request, metadata=meta)),
            await rpc_error(lambda: stub.StreamPredictions(request, metadata=meta)),
            await rpc_error(lambda: stub.StreamPredictions2(iter([request]), metadata=meta)),
        ]
    async with grpc.aio.insecure_channel(management_address) as channel:
        manage = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        list_models = management_pb2.ListModelsRequest()
        rpc.append(await rpc_error(lambda: manage.ListModels(list_models, metadata=meta)))
    for server in (grpc_inference, grpc_management):
        await server.stop(None)
    management.stop()
    inference.stop()
    await inference.close_all_connections()
    return {"rest": rest, "grpc": rpc}


def unfunnelled() -> list[str]:
    """Servicer methods that do not wear the gRPC error funnel."""
    from tsctl.proto_gen import health_pb2_grpc, inference_pb2_grpc, management_pb2_grpc
    from tsctl.server.api import grpc_api
    from tsctl.server.api.grpc_errors import is_funnelled

    missing = []
    for ours, base in (
        (grpc_api.InferenceService, inference_pb2_grpc.InferenceAPIsServiceServicer),
        (grpc_api.ManagementService, management_pb2_grpc.ManagementAPIsServiceServicer),
        (grpc_api.HealthService, health_pb2_grpc.HealthServicer),
    ):
        rpcs = [name for name in vars(base) if not name.startswith("_")]
        assert rpcs
        missing += [f"{ours.__name__}.{n}" for n in rpcs if not is_funnelled(getattr(ours, n))]
    return missing


def bug_report(tmp_path: Path) -> dict[str, Any]:
    """What clients got and what was logged (ERROR records with their tracebacks' text)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    report = asyncio.run(exercise(bugged_state(tmp_path)))
    text = logging.Formatter().formatException
    report["logged"] = [[r.name, r.getMessage(), r.exc_info and text(r.exc_info)] for r in records]
    report["unfunnelled"] = unfunnelled()
    return report


def test_a_bug_is_answered_without_its_details(tmp_path: Path) -> None:
    script = (
        "import json, sys; from pathlib import Path; "
        "from tests.e2e.test_error_funnel import bug_report; "
        "print(json.dumps(bug_report(Path(sys.argv[1]))))"
    )
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unfunnelled"] == []
    for status, request_id, doc in report["rest"]:  # inference (http1), management (tornado)
        assert status == 500 and request_id == "bug-rest", doc
        assert doc["code"] == 500 and doc["type"] == "InternalServerException", doc
        assert "ts_log.log" in doc["message"] and SECRET not in json.dumps(doc), doc
        assert "RuntimeError" not in json.dumps(doc), doc
    assert "request id bug-rest" in report["rest"][1][2]["message"]
    # Predictions, StreamPredictions, StreamPredictions2, ListModels
    assert len(report["grpc"]) == 4
    for code, details, trailing in report["grpc"]:
        assert code == "INTERNAL", (code, details)
        assert "request id bug-grpc" in details and "ts_log.log" in details, details
        assert SECRET not in details and "RuntimeError" not in details, details
        assert ["x-request-id", "bug-grpc"] in trailing
    logged = report["logged"]
    assert len(logged) == 6, logged  # one per request, each with the traceback
    assert all(name == "tsctl.server" and SECRET in (tb or "") for name, _, tb in logged), logged
    assert sum("request id bug-grpc" in message for _, message, _ in logged) == 4, logged
    assert any("request id bug-rest" in message for _, message, _ in logged), logged


def test_a_bug_in_the_cli_is_one_generic_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tsctl.archive import reader
    from tsctl.cli.app import EXIT_INTERNAL, main

    def open_archive(path: Path) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(reader, "open_archive", open_archive)
    with pytest.raises(SystemExit) as exited:
        main(["archive", "inspect", str(tmp_path / "m.mar")])
    assert exited.value.code == EXIT_INTERNAL
    out, err = capsys.readouterr()
    assert err.startswith("tsctl: error: internal error") and err.count("\n") == 1, err
    assert SECRET not in out + err and "RuntimeError" not in out + err
    assert "Traceback" not in out + err
