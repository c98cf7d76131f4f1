"""`tsctl.client` used as a library, as a user would: the same scenarios run over REST and
over gRPC against a real daemon with token authorization on (the library brings the keys).

The gRPC runs happen in a fresh interpreter (one, spawned once for the module): TorchServe's
own generated protos, which other test modules load into this process (`ts_protos`), hold the
same message names as tsctl's, and one process cannot load both.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from tests.support.daemon import Server, make_archive
from tsctl.client import (
    ApiError,
    Input,
    ModelEntry,
    ServerUnreachable,
    connect_inference,
    connect_management,
)
from tsctl.local.pidfile import PidInfo

#: a scenario: what a user does with the library, given the server's record and the protocol
Scenario = Callable[[PidInfo, bool], None]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("client"), properties={"enable_model_api": "true"})
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "swiss2", "swiss", version="2.0")
    srv.start("swiss.mar", auth=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fresh_process() -> Iterator[ProcessPoolExecutor]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        yield pool


@pytest.fixture(params=["rest", "grpc"])
def run(
    request: pytest.FixtureRequest, server: Server, fresh_process: ProcessPoolExecutor
) -> Callable[[Scenario], None]:
    """Run a scenario against the server over the parameter's protocol."""
    use_grpc = request.param == "grpc"
    info = server.info
    assert info is not None

    def run(scenario: Scenario) -> None:
        if use_grpc:
            fresh_process.submit(scenario, info, True).result()  # its failure is raised here
        else:
            scenario(info, False)

    return run


def manage_and_register(info: PidInfo, use_grpc: bool) -> None:
    name = f"lib_{'grpc' if use_grpc else 'rest'}"
    with connect_management(grpc=use_grpc, timeout=60, info=info) as manage:
        registered = manage.register("swiss2.mar", model_name=name, batch_size=2)
        assert registered == f'Model "{name}" Version: 2.0 registered with 1 initial workers'
        try:
            assert ModelEntry(name, "swiss2.mar") in manage.all_models()
            first = manage.list_models(limit=1)
            assert len(first.models) == 1 and first.next_page_token == 1
            rest = manage.list_models(limit=100, next_page_token=1)
            assert rest.next_page_token is None
            assert first.models + rest.models == manage.all_models(page_size=1)

            [described] = manage.describe(name)
            assert (described["modelName"], described["modelVersion"]) == (name, "2.0")
            assert described["batchSize"] == 2 and len(described["workers"]) == 1
            assert manage.scale(name, 2) == f"Workers scaled to 2 for model: {name}"
            [described] = manage.describe(name, "2.0")
            assert [w["status"] for w in described["workers"]] == ["READY", "READY"]
            assert [d["modelVersion"] for d in manage.describe(name, all_versions=True)] == ["2.0"]
        finally:
            assert manage.unregister(name) == f'Model "{name}" unregistered'
        assert name not in {m.name for m in manage.all_models()}


def versions_and_default(info: PidInfo, use_grpc: bool) -> None:
    manage = connect_management(grpc=use_grpc, timeout=60, info=info)
    infer = connect_inference(grpc=use_grpc, timeout=60, info=info)
    with manage, infer:
        manage.register("swiss2.mar", model_name="swiss")
        try:
            assert infer.predict("swiss", b"{}").json()["version"] == "1.0"
            assert infer.predict("swiss", b"{}", version="2.0").json()["version"] == "2.0"
            assert manage.set_default("swiss", "2.0").startswith(
                "Default version successfully updated"
            )
            assert infer.predict("swiss", b"{}").json()["version"] == "2.0"
            described = manage.describe("swiss", all_versions=True)
            assert {d["modelVersion"] for d in described} == {"1.0", "2.0"}
        finally:
            manage.set_default("swiss", "1.0")
            manage.unregister("swiss", "2.0")
        assert [d["modelVersion"] for d in manage.describe("swiss", all_versions=True)] == ["1.0"]


def predict_and_ping(info: PidInfo, use_grpc: bool) -> None:
    with connect_inference(grpc=use_grpc, timeout=60, info=info) as infer:
        assert infer.ping() == "Healthy"
        one = infer.predict("swiss", Input("data", b'{"action": "echo"}', "application/json"))
        assert one.status == 200 and one.content_type.startswith("application/json")
        assert one.json()["batch"] == 1
        several = infer.predict("swiss", [Input("a", b"1"), Input("b", b"22", filename="b.bin")])
        assert several.json()["types"] == {"a": "bytearray", "b": "bytearray"}
        assert several.json()["values"] == {"a": 1, "b": 2}


def assert_api_error(error: ApiError, use_grpc: bool, status: int, code: str, kind: str) -> None:
    """The server's error, as each protocol carries it."""
    if use_grpc:
        assert (error.status, error.code) == (None, code)
        assert error.message == f"{code}: {error.detail}"
    else:
        assert (error.status, error.code, error.kind) == (status, None, kind)
        assert error.message == f"{status} {kind}: {error.detail}"


def server_errors(info: PidInfo, use_grpc: bool) -> None:
    manage = connect_management(grpc=use_grpc, timeout=60, info=info)
    infer = connect_inference(grpc=use_grpc, timeout=60, info=info)
    with manage, infer:
        for call in (lambda: manage.describe("nope"), lambda: infer.predict("nope", b"x")):
            try:
                call()
                raise AssertionError("no error")
            except ApiError as error:
                assert error.detail == "Model not found: nope"
                assert_api_error(error, use_grpc, 404, "NOT_FOUND", "ModelNotFoundException")
        try:
            manage.register("swiss.mar")
            raise AssertionError("no error")
        except ApiError as error:
            assert error.detail == "Model version 1.0 is already registered for model swiss"
            assert_api_error(error, use_grpc, 409, "ALREADY_EXISTS", "ConflictStatusException")


def keys_only_for_the_local_server(info: PidInfo, use_grpc: bool) -> None:
    """A URL given without the server's record gets no key: the server refuses it."""
    url = info.grpc_management_address if use_grpc else info.management_address
    with connect_management(url, grpc=use_grpc, timeout=60) as stranger:
        try:
            stranger.all_models()
            raise AssertionError("no error")
        except ApiError as error:
            assert error.status == 400 or error.code == "UNAUTHENTICATED"
            assert error.detail.startswith("Token Authorization failed")
    with connect_management(url, grpc=use_grpc, timeout=60, info=info) as client:
        assert ModelEntry("swiss", "swiss.mar") in client.all_models()


def no_server(info: PidInfo, use_grpc: bool) -> None:
    with connect_inference("127.0.0.1:9", grpc=use_grpc, timeout=30) as nowhere:
        try:
            nowhere.predict("swiss", b"x")
            raise AssertionError("no error")
        except ServerUnreachable:
            pass


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        manage_and_register,
        versions_and_default,
        predict_and_ping,
        server_errors,
        keys_only_for_the_local_server,
        no_server,
    ],
    ids=lambda scenario: scenario.__name__,
)
def test_the_library(run: Callable[[Scenario], None], scenario: Scenario) -> None:
    run(scenario)


def test_the_library_imports_no_server_and_rest_no_grpc() -> None:
    """`import tsctl.client` loads no daemon code and no heavy framework; the gRPC
    implementation loads grpc, still no daemon code."""
    code = (
        "import json, sys\n"
        "import tsctl.client\n"
        "before = sorted(sys.modules)\n"
        "import tsctl.client.grpc_client\n"
        "print(json.dumps([before, sorted(sys.modules)]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rest, grpc = json.loads(run.stdout)

    def loaded(modules: list[str], *roots: str) -> list[str]:
        return [m for m in modules if m.split(".")[0] in roots or m.startswith(roots)]

    assert loaded(rest, "torch", "grpc", "tornado", "tsctl.server") == []
    assert loaded(grpc, "torch", "tornado", "tsctl.server") == []
    assert "grpc" in grpc
