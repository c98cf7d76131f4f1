"""gRPC stubs of a test daemon's TorchServe services (inference and management)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc

from tests.support.daemon import Server


@contextlib.contextmanager
def torchserve_stubs(server: Server, protos: dict[str, ModuleType]) -> Iterator[tuple[Any, Any]]:
    """(inference stub, management stub) on insecure channels, closed at the end."""
    assert server.info is not None
    inference = grpc.insecure_channel(server.info.grpc_inference_address)
    manage = grpc.insecure_channel(server.info.grpc_management_address)
    try:
        yield (
            protos["inference_pb2_grpc"].InferenceAPIsServiceStub(inference),
            protos["management_pb2_grpc"].ManagementAPIsServiceStub(manage),
        )
    finally:
        inference.close()
        manage.close()
