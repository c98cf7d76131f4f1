"""Request envelopes (`service_envelope`): tsctl's `ts.torch_handler.request_envelope` classes
called directly with a real `Context`, then served by real daemons over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Response, Server, dedent
from tsctl.errors import InvalidInput
from tsctl.server.config import build_config
from tsctl.worker import envelope
from tsctl.worker.context import Context, RequestProcessor
from tsctl.worker.envelope import EnvelopeInputError
from tsctl.worker.loader import COMPAT_PATH, HandlerLoadError, install_compat_path

MANIFEST = {"model": {"modelName": "echo", "modelVersion": "2.0", "handler": "echo.py"}}


@pytest.fixture
def compat() -> Iterator[None]:
    """`import ts` finds tsctl's package for the test; sys.path and sys.modules are restored."""
    saved_path = list(sys.path)
    saved = {n: m for n, m in sys.modules.items() if n == "ts" or n.startswith("ts.")}
    install_compat_path()
    yield
    sys.path[:] = saved_path
    for name in [n for n in sys.modules if n == "ts" or n.startswith("ts.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def make_context(*headers: dict[str, str]) -> Context:
    """A worker's context during a batch of `len(headers)` requests."""
    context = Context("echo", "/nowhere", MANIFEST, len(headers), None, "test")
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    return context


class Recorder:
    """A handler that answers each input with a small record and keeps what it saw."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def handle(self, data: Any, context: Any) -> Any:
        self.calls.append(data)
        if data is None:
            return "initialized"
        return [{"echo": _plain(item), "batch": len(data)} for item in data]

    def describe_handle(self) -> str:
        return "recorder"


def _plain(item: Any) -> Any:
    return item.decode() if isinstance(item, bytes) else item


def wrapped(name: str, handler: Any = None) -> Any:
    return envelope.wrap(handler or Recorder().handle, name)


# --- choosing an envelope ------------------------------------------------------------------


def test_wrap_uses_tsctls_classes(compat: None) -> None:
    handle = wrapped("json")
    assert type(handle.__self__).__name__ == "JSONEnvelope"
    module = sys.modules[type(handle.__self__).__module__]
    assert module.__file__ is not None and module.__file__.startswith(COMPAT_PATH)


def test_no_envelope_leaves_the_entry_alone() -> None:
    entry = Recorder().handle
    assert envelope.wrap(entry, None) is entry
    assert envelope.wrap(entry, "") is entry


def test_unknown_envelope_is_a_load_error() -> None:
    with pytest.raises(HandlerLoadError, match="unknown service_envelope 'kfserving'"):
        envelope.wrap(Recorder().handle, "kfserving")


def test_config_names_a_known_envelope() -> None:
    assert build_config({"service_envelope": "kservev2"}, {}).service_envelope == "kservev2"
    assert build_config({}, {}).service_envelope == ""
    with pytest.raises(InvalidInput, match=r"service_envelope.*'grpc'.*json, kserve, kservev2"):
        build_config({"service_envelope": "grpc"}, {})


def test_load_time_call_and_describe_reach_the_handler(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kserve")
    assert handle(None, make_context()) == "initialized"
    assert recorder.calls == [None]
    assert handle.__self__.describe_handle() == "recorder"


def test_envelope_names_are_shared_with_the_frontend() -> None:
    from tsctl.ipc import codec as protocol

    assert envelope.ENVELOPES is protocol.ENVELOPES
    assert envelope.INPUT_FAILURE_KIND == protocol.INPUT_FAILURE_KIND == "InvalidInput"
    assert envelope.check_name("json") == "json"


class Described:
    """A handler object whose `handle` is a MicroBatching of itself (TorchServe's pattern)."""

    def __init__(self, micro_batching: Any) -> None:
        self.handle = micro_batching(self)

    def preprocess(self, data: Any) -> Any:
        return data

    inference = postprocess = preprocess

    def describe_handle(self) -> dict[str, Any]:
        return {"described": True}


def test_describe_reaches_a_micro_batching_handler_inside_an_envelope(compat: None) -> None:
    from ts.handler_utils.micro_batching import MicroBatching

    from tsctl.worker.service import Service

    handler = Described(MicroBatching)
    try:
        entry = envelope.wrap(handler.handle, "json")
        assert envelope.unwrap_handler(entry) is handler
        assert entry.__self__.describe_handle() == {"described": True}
        described = Service(entry, make_context()).describe()
        assert described.failure is None
        assert json.loads(described.body) == {"described": True}
        # and the pipeline still answers through the envelope
        answers = entry([{"body": {"instances": [1, 2]}}], make_context({}))
        assert answers == ['{"predictions": [1, 2]}']
    finally:
        handler.handle.shutdown()


def test_unwrap_handler_stops_at_the_handler() -> None:
    recorder = Recorder()
    assert envelope.unwrap_handler(recorder.handle) is recorder
    assert envelope.unwrap_handler(recorder) is recorder
    assert envelope.unwrap_handler(_plain) is _plain  # a function handler is its own answer


def test_handler_sees_only_the_requests_it_reads(compat: None) -> None:
    """A rejected request takes no part in the handler call, so the context's per-request
    lists hold only the others while it runs: index 0 is the first request it reads."""
    seen: list[Any] = []

    def handler(data: Any, context: Any) -> Any:
        if data is None:
            return None
        for idx in range(len(context.request_processor)):
            seen.append((context.get_request_id(idx), context.get_request_header(idx, "who")))
            context.set_response_status(201 + idx, "Chosen", idx)
        return [f"r{i}" for i in range(len(data))]

    handle = envelope.wrap(handler, "kserve")
    context = make_context({"who": "bad"}, {"who": "first", "explain": "True"}, {"who": "last"})
    rows = [
        {"body": {"wrong": 1}},
        {"body": {"instances": [1]}},
        {"body": {"instances": [2]}},
    ]
    answers = handle(rows, context)
    assert seen == [("req-1", "first"), ("req-2", "last")]
    assert isinstance(answers[0], EnvelopeInputError)
    # format_output reads the full lists again: request 1's explain header is its own
    assert answers[1:] == [{"explanations": ["r0"]}, {"predictions": ["r1"]}]
    assert context.request_ids == {0: "req-0", 1: "req-1", 2: "req-2"}
    assert [context.get_response_status(i) for i in range(3)] == [
        (200, None),  # the rejected request's answer is untouched
        (201, "Chosen"),
        (202, "Chosen"),
    ]


# --- json ----------------------------------------------------------------------------------


def test_json_joins_instances_and_gives_each_request_its_share(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    rows = [
        {"body": {"instances": [1, {"a": [2, 3]}]}},
        {"body": bytearray(b'{"instances": ["x"]}')},  # a body that was not application/json
    ]
    answers = handle(rows, make_context({}, {}))
    assert recorder.calls == [[1, {"a": [2, 3]}, "x"]]  # one handler call for the batch
    assert answers == [
        '{"predictions": [{"echo": 1, "batch": 3}, {"echo": {"a": [2, 3]}, "batch": 3}]}',
        '{"predictions": [{"echo": "x", "batch": 3}]}',
    ]


def test_json_decodes_b64_instances_and_fields(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    rows = [{"body": {"instances": [{"b64": "aGk="}, {"img": {"b64": "YQ=="}, "k": 1}]}}]
    assert handle(rows, make_context({})) == [
        '{"predictions": [{"echo": "hi", "batch": 2}, {"echo": {"img": "a", "k": 1}, "batch": 2}]}'
    ]
    assert recorder.calls == [[b"hi", {"img": b"a", "k": 1}]]


def test_json_single_request_takes_the_results_as_torchserve_does(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [len(data)], "json")
    assert handle([{"body": {"instances": [7, 8, 9]}}], make_context({})) == [
        '{"predictions": [3]}'
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (bytearray(b"not json"), "this body is not JSON"),
        ({"rows": [1]}, 'the body has no "instances" list'),
        ({"instances": {"a": 1}}, 'the body has no "instances" list'),
        ([1, 2], "not a JSON array"),
        ({"instances": [{"b64": "a"}]}, 'an instance\'s "b64" value is not valid base64'),
    ],
)
def test_json_bad_request_fails_alone(compat: None, body: Any, needle: str) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    answers = handle([{"body": body}, {"body": {"instances": [5]}}], make_context({}, {}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert needle in answers[0].message
    assert answers[1] == '{"predictions": [{"echo": 5, "batch": 1}]}'
    assert recorder.calls == [[5]]


def test_json_batch_of_bad_requests_skips_the_handler(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "json")
    answers = handle([{"body": b"{"}, {"body": {}}], make_context({}, {}))
    assert all(isinstance(a, EnvelopeInputError) for a in answers)
    assert recorder.calls == []


def test_several_requests_need_one_result_per_input(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else ["only one"], "json")
    rows = [{"body": {"instances": [1]}}, {"body": {"instances": [2]}}]
    with pytest.raises(ValueError, match="returned 1 results for 2 inputs from 2 requests"):
        handle(rows, make_context({}, {}))


# --- kserve (v1) ---------------------------------------------------------------------------


def test_kserve_predictions_and_explanations(compat: None) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kserve")
    rows = [
        {"body": {"instances": [[1, 2]]}},
        {"body": bytearray(b'{"instances": [{"data": "aGk="}, 3]}')},
    ]
    answers = handle(rows, make_context({}, {"explain": "True"}))
    assert answers == [
        {"predictions": [{"echo": [1, 2], "batch": 3}]},
        {"explanations": [{"echo": {"data": "aGk="}, "batch": 3}, {"echo": 3, "batch": 3}]},
    ]


def test_kserve_single_request_keeps_any_result(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else {"sum": 6}, "kserve")
    assert handle([{"body": {"instances": [1, 2, 3]}}], make_context({})) == [
        {"predictions": {"sum": 6}}
    ]


def test_kserve_without_instances_fails_alone(compat: None) -> None:
    handle = envelope.wrap(Recorder().handle, "kserve")
    answers = handle([{"body": {"inputs": []}}], make_context({}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert 'the kserve envelope expects {"instances": [...]}' in answers[0].message


# --- kservev2 (Open Inference Protocol) ----------------------------------------------------


def v2_request(*inputs: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(inputs)}
    if request_id is not None:
        body["id"] = request_id
    return {"body": body}


def test_kservev2_reads_tensors_and_writes_outputs(compat: None) -> None:
    seen: list[Any] = []

    def handler(data: Any, context: Any) -> Any:
        if data is None:
            return None
        seen.append((data, list(context.input_names)))
        return [item["data"] for item in data]

    handle = envelope.wrap(handler, "kservev2")
    rows = [
        v2_request(
            {"name": "m", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]},
            {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hello", "ignored"]},
            request_id="abc",
        ),
        v2_request({"name": "n", "shape": [-1, 1], "datatype": "INT64", "data": [[7], [8]]}),
    ]
    context = make_context({}, {})
    answers = handle(rows, context)
    data, names = seen[0]
    assert [d["data"] for d in data] == [[[1.0, 2.0], [3.0, 4.5]], "hello", [[7], [8]]]
    assert data[0]["datatype"] == "FP32"  # the rest of each input object is kept
    assert names == ["m", "s", "n"]
    assert not hasattr(context, "input_names")  # only while the handler runs
    assert answers == [
        {
            "id": "abc",
            "model_name": "echo",
            "model_version": "2.0",
            "outputs": [
                {"name": "m", "datatype": "FP64", "data": [1.0, 2.0, 3.0, 4.5], "shape": [4]},
                {"name": "s", "datatype": "BYTES", "data": ["hello"], "shape": [1]},
            ],
        },
        {
            "id": "req-1",  # no id of its own: the server's request id
            "model_name": "echo",
            "model_version": "2.0",
            "outputs": [{"name": "n", "datatype": "INT64", "data": [7, 8], "shape": [2]}],
        },
    ]


def test_kservev2_infers_datatypes_like_torchserve(compat: None) -> None:
    import torch

    results = [
        torch.tensor([[1.5, 2.0]]),
        torch.tensor([1, 2], dtype=torch.int32),
        [True, False],
        [[1, 2], [3, 4]],
        [1, 2.5],
        [1, "a", 2.5],
        "text",
        7,
        [],
    ]
    names = [f"i{k}" for k in range(len(results))]
    handle = envelope.wrap(lambda data, ctx: None if data is None else results, "kservev2")
    inputs = [{"name": n, "shape": [1], "datatype": "INT64", "data": [0]} for n in names]
    [answer] = handle([v2_request(*inputs, request_id="t")], make_context({}))
    outputs = {o["name"]: (o["datatype"], o["data"], o["shape"]) for o in answer["outputs"]}
    assert outputs == {
        "i0": ("FP32", [1.5, 2.0], [2]),
        "i1": ("INT32", [1, 2], [2]),
        "i2": ("BOOL", [True, False], [2]),
        "i3": ("INT64", [1, 2, 3, 4], [4]),
        "i4": ("FP64", [1.0, 2.5], [2]),
        "i5": ("BYTES", ["1", "a", "2.5"], [3]),
        "i6": ("BYTES", ["text"], [1]),
        "i7": ("INT64", [7], [1]),
        "i8": ("FP64", [], [0]),
    }


def test_kservev2_fewer_results_than_inputs_for_one_request(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [[1]], "kservev2")
    two = [{"name": n, "shape": [1], "datatype": "FP32", "data": [1]} for n in ("a", "b")]
    [answer] = handle([v2_request(*two, request_id="x")], make_context({}))
    assert answer["outputs"] == [{"name": "a", "datatype": "INT64", "data": [1], "shape": [1]}]


def test_kservev2_more_results_than_inputs_fails(compat: None) -> None:
    handle = envelope.wrap(lambda data, ctx: None if data is None else [1, 2], "kservev2")
    one = {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}
    with pytest.raises(ValueError, match="returned 2 results for 1 inputs"):
        handle([v2_request(one)], make_context({}))


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "2 values do not fit"),
        ({"name": "x", "shape": "3", "datatype": "FP32", "data": [1]}, '"shape" must be a list'),
        ({"name": "x", "shape": [-1, -1], "datatype": "FP32", "data": [1]}, "at most one -1"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, 'input 0 has no "name"'),
        ({"name": "x", "shape": [1], "data": [1]}, "input 'x' has no \"datatype\""),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "input 'x' has no \"data\" list"),
        ({"name": "x", "shape": [1], "datatype": "BYTES", "data": []}, '"data" is empty'),
        ("x", "input 0 is not an object"),
    ],
)
def test_kservev2_bad_input_fails_alone(compat: None, tensor: Any, needle: str) -> None:
    recorder = Recorder()
    handle = envelope.wrap(recorder.handle, "kservev2")
    good = {"name": "ok", "shape": [1], "datatype": "INT64", "data": [3]}
    answers = handle([v2_request(tensor), v2_request(good)], make_context({}, {}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert needle in answers[0].message
    assert answers[1]["outputs"][0]["name"] == "ok"
    assert len(recorder.calls) == 1


def test_kservev2_without_inputs_fails_alone(compat: None) -> None:
    handle = envelope.wrap(Recorder().handle, "kservev2")
    answers = handle([{"body": bytearray(b'{"instances": [1]}')}], make_context({}))
    assert isinstance(answers[0], EnvelopeInputError)
    assert 'the body has no "inputs" list' in answers[0].message


# --- served by real daemons ----------------------------------------------------------------

ECHO_HANDLER = dedent(
    """
    import os
    import time


    def _hold(path):
        # tells the test it runs, then waits for its go: the worker stays busy meanwhile
        open(path + ".started", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)


    def handle(data, context):
        if data is None:
            return None
        out = []
        for item in data:
            if isinstance(item, dict) and "datatype" in item:  # a kservev2 input
                if item["name"] == "hold":
                    _hold(item["data"])
                out.append(len(data) if item["name"] == "count" else item["data"])
                continue
            if isinstance(item, dict) and "hold" in item:
                _hold(item["hold"])
            if isinstance(item, (bytes, bytearray)):
                item = bytes(item).decode()
            out.append({"echo": item, "batch": len(data)})
        return out
    """
)


def archive_echo(tma: Path, store: Path, work: Path, name: str, config: str = "") -> None:
    """The echo handler archived by the real torch-model-archiver 0.12."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "echo.py").write_text(ECHO_HANDLER)
    args = [str(tma), "--model-name", name, "--version", "1.0", "--handler", "echo.py"]
    if config:
        (work / f"{name}.yaml").write_text(config)
        args += ["--config-file", f"{name}.yaml"]
    store.mkdir(parents=True, exist_ok=True)
    args += ["--export-path", str(store), "--force"]
    subprocess.run(args, cwd=work, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tma_exe() -> Path:
    exe = Path(sys.executable).parent / "torch-model-archiver"
    assert exe.exists(), "torch-model-archiver==0.12.0 is a dev dependency"
    return exe


def serve(root: Path, tma: Path, name: str) -> Server:
    srv = Server(root, {"service_envelope": name})
    archive_echo(tma, srv.store, root / "src", "echo")
    archive_echo(tma, srv.store, root / "src", "pair", "batchSize: 2\nmaxBatchDelay: 100\n")
    srv.start("echo.mar", "pair.mar")
    return srv


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("json"), tma_exe, "json")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("kserve"), tma_exe, "kserve")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def v2_server(tmp_path_factory: pytest.TempPathFactory, tma_exe: Path) -> Iterator[Server]:
    srv = serve(tmp_path_factory.mktemp("kservev2"), tma_exe, "kservev2")
    yield srv
    srv.stop()


def one_batch(server: Server, hold: Callable[[str], dict[str, Any]], *bodies: Any) -> list[Any]:
    """Answers to `bodies`, sent by separate clients and run by `pair` as one batch: its only
    worker is kept busy (by a request `hold(path)` that waits for `path`) until all of them
    are queued, then it takes them together."""
    go = server.root / f"go-{uuid.uuid4().hex}"
    answers: list[Response | None] = [None] * (len(bodies) + 1)

    def send(i: int, body: Any) -> None:
        answers[i] = server.predict("pair", body)

    busy = threading.Thread(target=send, args=(len(bodies), hold(str(go))))
    busy.start()
    server.wait_for(Path(f"{go}.started").exists)
    clients = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for client in clients:
        client.start()
    server.wait_for(lambda: server.queued("pair") == len(bodies))
    go.touch()
    for thread in [busy, *clients]:
        thread.join(120)
    assert all(a is not None and a.status == 200 for a in answers), answers
    return [a.json() for a in answers[:-1] if a is not None]


def assert_bad_request(response: Response, *needles: str) -> None:
    assert response.status == 400, (response.status, response.body)
    doc = response.json()
    assert doc["code"] == 400 and doc["type"] == "BadRequestException", doc
    for needle in needles:
        assert needle in doc["message"], doc


@pytest.mark.slow
def test_served_json(json_server: Server) -> None:
    response = json_server.predict("echo", {"instances": [1, {"a": 2}, {"b64": "aGk="}]})
    assert response.status == 200, response.body
    expected = {"predictions": [{"echo": v, "batch": 3} for v in (1, {"a": 2}, "hi")]}
    assert response.body == json.dumps(expected).encode()


@pytest.mark.slow
def test_served_json_batch_is_regrouped(json_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    first, second = one_batch(json_server, hold, {"instances": ["a", "b"]}, {"instances": ["c"]})
    # one handler call saw the three instances; each client got its own share back
    assert first == {"predictions": [{"echo": "a", "batch": 3}, {"echo": "b", "batch": 3}]}
    assert second == {"predictions": [{"echo": "c", "batch": 3}]}


@pytest.mark.slow
def test_served_json_bad_body(json_server: Server) -> None:
    response = json_server.predict("echo", b"nope", headers={"Content-Type": "application/json"})
    assert_bad_request(response, "json envelope", "not JSON")
    response = json_server.predict("echo", {"rows": []})
    assert_bad_request(response, 'no "instances" list')


@pytest.mark.slow
def test_served_json_bad_request_in_a_batch_fails_alone(json_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    go = json_server.root / f"go-{uuid.uuid4().hex}"
    answers: dict[str, Response] = {}

    def send(key: str, body: Any) -> None:
        answers[key] = json_server.predict("pair", body)

    busy = threading.Thread(target=send, args=("hold", hold(str(go))))
    busy.start()
    json_server.wait_for(Path(f"{go}.started").exists)
    good = threading.Thread(target=send, args=("good", {"instances": [1]}))
    bad = threading.Thread(target=send, args=("bad", {"wrong": 1}))
    good.start()
    bad.start()
    json_server.wait_for(lambda: json_server.queued("pair") == 2)
    go.touch()
    for thread in (busy, good, bad):
        thread.join(120)
    assert answers["good"].json() == {"predictions": [{"echo": 1, "batch": 1}]}
    assert_bad_request(answers["bad"], 'no "instances" list')


@pytest.mark.slow
def test_served_kserve(kserve_server: Server) -> None:
    response = kserve_server.predict("echo", {"instances": [[1, 2], "x"]})
    assert response.status == 200, response.body
    assert response.json() == {
        "predictions": [{"echo": [1, 2], "batch": 2}, {"echo": "x", "batch": 2}]
    }
    response = kserve_server.predict("echo", {"instances": [3]}, headers={"explain": "True"})
    assert response.json() == {"explanations": [{"echo": 3, "batch": 1}]}
    assert_bad_request(kserve_server.predict("echo", {"inputs": []}), 'no "instances" list')


@pytest.mark.slow
def test_served_kserve_batch_is_regrouped(kserve_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"instances": [{"hold": path}]}

    answers = one_batch(kserve_server, hold, {"instances": [1]}, {"instances": [2, 3]})
    assert answers == [
        {"predictions": [{"echo": 1, "batch": 3}]},
        {"predictions": [{"echo": 2, "batch": 3}, {"echo": 3, "batch": 3}]},
    ]


@pytest.mark.slow
def test_served_kservev2(v2_server: Server) -> None:
    request = {
        "id": "r-1",
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        ],
    }
    response = v2_server.predict("echo", request)
    assert response.status == 200, response.body
    assert response.json() == {
        "id": "r-1",
        "model_name": "echo",
        "model_version": "1.0",
        "outputs": [
            {"name": "x", "datatype": "INT64", "data": [1, 2, 3, 4], "shape": [4]},
            {"name": "t", "datatype": "BYTES", "data": ["hi"], "shape": [1]},
        ],
    }
    del request["id"]
    response = v2_server.predict("echo", request)
    assert response.json()["id"] == response.headers["x-request-id"]
    bad = {"inputs": [{"name": "q", "shape": [3], "datatype": "INT64", "data": [1, 2]}]}
    assert_bad_request(v2_server.predict("echo", bad), "2 values do not fit shape [3]")


@pytest.mark.slow
def test_served_kservev2_batch_is_regrouped(v2_server: Server) -> None:
    def hold(path: str) -> dict[str, Any]:
        return {"inputs": [{"name": "hold", "shape": [1], "datatype": "BYTES", "data": [path]}]}

    count = {"name": "count", "shape": [1], "datatype": "INT64", "data": [0]}
    one = {"id": "a", "inputs": [{"name": "p", "shape": [1], "datatype": "FP64", "data": [0.5]}]}
    two = {"id": "b", "inputs": [{"name": "q", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
    first, second = one_batch(v2_server, hold, one, {**two, "inputs": [*two["inputs"], count]})
    assert first["id"] == "a" and second["id"] == "b"
    assert first["outputs"] == [{"name": "p", "datatype": "FP64", "data": [0.5], "shape": [1]}]
    assert second["outputs"] == [
        {"name": "q", "datatype": "INT64", "data": [1, 2], "shape": [2]},
        # the handler ran once for both requests: three inputs
        {"name": "count", "datatype": "INT64", "data": [3], "shape": [1]},
    ]
