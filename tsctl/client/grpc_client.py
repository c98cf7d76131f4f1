"""A small gRPC client for the inference and management APIs (TorchServe's protos).

Blocking, thread-safe (one channel serves many threads). Failures come back as `ApiError`
(the server answered with a status; the message is `CODE: details`) or `ServerUnreachable`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from tsctl.client.rest import ApiError
from tsctl.errors import ServerUnreachable
from tsctl.proto_gen import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

#: the client never limits messages; the server's max_request_size / max_response_size do
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def inputs(files: Sequence[Path]) -> dict[str, bytes]:
    """One file as `data` (TorchServe's usual key), several under their own names."""
    if len(files) == 1:
        return {"data": files[0].read_bytes()}
    found: dict[str, bytes] = {}
    for path in files:
        name, n = path.name, 1
        while name in found:
            n += 1
            name = f"{path.name}.{n}"
        found[name] = path.read_bytes()
    return found


class GrpcClient:
    def __init__(self, target: str, token: str | None = None, timeout: float = 600) -> None:
        self.target = target.removeprefix("http://")
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(self.target, options=_UNLIMITED)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(self.target, exc) from None

    def predict(self, model: str, files: Sequence[Path], version: str | None = None) -> bytes:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version or "", input=inputs(files)
        )
        answer: bytes = self._call(stub.Predictions, request).prediction
        return answer

    def stream(
        self, model: str, files: Sequence[Path], version: str | None = None
    ) -> Iterator[bytes]:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version or "", input=inputs(files)
        )
        try:
            for answer in stub.StreamPredictions(
                request, timeout=self.timeout, metadata=self.metadata
            ):
                yield answer.prediction
        except grpc.RpcError as exc:
            raise _error(self.target, exc) from None

    def manage(self, rpc: str, **fields: Any) -> Any:
        """Call a management RPC by name; returns the JSON it answered."""
        stub = management_pb2_grpc.ManagementAPIsServiceStub(self.channel)
        request_type = {
            "DescribeModel": management_pb2.DescribeModelRequest,
            "ListModels": management_pb2.ListModelsRequest,
            "RegisterModel": management_pb2.RegisterModelRequest,
            "ScaleWorker": management_pb2.ScaleWorkerRequest,
            "SetDefault": management_pb2.SetDefaultRequest,
            "UnregisterModel": management_pb2.UnregisterModelRequest,
        }[rpc]
        given = {k: v for k, v in fields.items() if v is not None}
        return json.loads(self._call(getattr(stub, rpc), request_type(**given)).msg)


def _error(target: str, exc: grpc.RpcError) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        return ServerUnreachable(f"cannot reach the gRPC server at {target}")
    name = code.name if code is not None else "UNKNOWN"
    return ApiError(0, f"{name}: {details}")
