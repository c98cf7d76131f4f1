"""Management semantics TorchServe's clients and tests rely on, beyond the REST basics of
test_management.py: the `models` setting as per-model configuration, and the gRPC management
API with the model API off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

MODELS = {"swiss": {"1.0": {"minWorkers": 1, "maxWorkers": 3, "batchSize": 2}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Model API off (the default), two workers per model by default, and a `models` setting
    that asks one for `swiss`."""
    srv = Server(
        tmp_path_factory.mktemp("semantics"),
        properties={"default_workers_per_model": 2, "models": json.dumps(MODELS)},
    )
    make_archive(srv.store, "swiss", "swiss")
    make_archive(srv.store, "plain", "swiss")
    make_archive(srv.store, "extra", "swiss")
    srv.start("swiss.mar", "plain.mar")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def manage(server: Server, ts_protos: dict[str, ModuleType]) -> Iterator[Any]:
    assert server.info is not None
    channel = grpc.insecure_channel(server.info.grpc_management_address)
    yield ts_protos["management_pb2_grpc"].ManagementAPIsServiceStub(channel)
    channel.close()


def described(server: Server, name: str) -> dict[str, Any]:
    [doc] = server.manage("GET", f"/models/{name}").json()
    return dict(doc)


def test_the_models_setting_wins_over_default_workers_per_model(server: Server) -> None:
    swiss = described(server, "swiss")
    assert (swiss["minWorkers"], swiss["maxWorkers"], swiss["batchSize"]) == (1, 3, 2)
    assert len(swiss["workers"]) == 1
    plain = described(server, "plain")  # not in the setting: default_workers_per_model
    assert (plain["minWorkers"], len(plain["workers"])) == (2, 2)


def test_grpc_register_and_unregister_say_model_api_disabled(
    server: Server, manage: Any, ts_protos: dict[str, ModuleType]
) -> None:
    pb = ts_protos["management_pb2"]
    calls = [
        lambda: manage.RegisterModel(pb.RegisterModelRequest(url="extra.mar", synchronous=True)),
        lambda: manage.UnregisterModel(pb.UnregisterModelRequest(model_name="swiss")),
        lambda: manage.UnregisterModel(pb.UnregisterModelRequest(model_name="missing")),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == "Model API disabled"
    listed = json.loads(manage.ListModels(pb.ListModelsRequest()).msg)
    assert [m["modelName"] for m in listed["models"]] == ["plain", "swiss"]


def test_grpc_scale_and_describe_still_work(
    server: Server, manage: Any, ts_protos: dict[str, ModuleType]
) -> None:
    pb = ts_protos["management_pb2"]
    request = pb.ScaleWorkerRequest(model_name="plain", min_worker=1, synchronous=True)
    assert manage.ScaleWorker(request).msg == "Workers scaled to 1 for model: plain"
    [doc] = json.loads(manage.DescribeModel(pb.DescribeModelRequest(model_name="plain")).msg)
    assert (doc["minWorkers"], doc["maxWorkers"], len(doc["workers"])) == (1, 1, 1)
