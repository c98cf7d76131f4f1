"""The client library over gRPC (TorchServe's inference and management protos).

`GrpcClient` is the transport: one channel (thread-safe, one serves many threads) and the
key as `authorization` metadata. `GrpcManagementClient` and `GrpcInferenceClient` implement
the library's interface (`tsctl.client.base`) on it: each management RPC answers the same
JSON as its REST twin, in `msg`. Failures come back as `ApiError` (the server answered with
a status: `code` is its name, `detail` its details) or `ServerUnreachable`. Imports grpc:
import this module only when gRPC is wanted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2  # type: ignore[import-untyped]

from tsctl.client.base import (
    ApiError,
    InferenceClient,
    Input,
    ManagementClient,
    ModelPage,
    Prediction,
    as_inputs,
    descriptions,
    model_page,
    status_message,
    status_text,
)
from tsctl.client.tls import TlsOptions
from tsctl.errors import ServerUnreachable
from tsctl.proto_gen import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

#: the client never limits messages; the server's max_request_size / max_response_size do
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class GrpcClient:
    """A channel to one gRPC API at `target` (`host:port`), with the key if given."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 600,
        tls: TlsOptions | None = None,
    ) -> None:
        """`target`: `host:port`, or `https://host:port` for a server that uses TLS (`tls`
        says how its certificate is checked)."""
        secure = target.startswith("https://")
        self.target = target.removeprefix("https://").removeprefix("http://")
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if secure:
            credentials = (tls or TlsOptions()).grpc_credentials()
            self.channel = grpc.secure_channel(self.target, credentials, options=_UNLIMITED)
        else:
            self.channel = grpc.insecure_channel(self.target, options=_UNLIMITED)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Any, request: Any) -> Any:
        """A unary call; a failure is an `ApiError` or `ServerUnreachable`."""
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(self.target, exc) from None

    def stream(self, method: Any, request: Any) -> Iterator[Any]:
        """A server-streaming call's messages, as they come."""
        try:
            yield from method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(self.target, exc) from None


class GrpcManagementClient(ManagementClient):
    """The management API over gRPC (`ManagementAPIsService`)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 600,
        tls: TlsOptions | None = None,
    ) -> None:
        self.transport = GrpcClient(target, token, timeout, tls)
        self.stub = management_pb2_grpc.ManagementAPIsServiceStub(self.transport.channel)

    def close(self) -> None:
        self.transport.close()

    def _call(self, method: Any, request: Any) -> object:
        return json.loads(self.transport.call(method, request).msg)

    def _status(self, method: Any, request: Any) -> str:
        return status_text(self.transport.call(method, request).msg)

    def list_models(self, limit: int = 100, next_page_token: int = 0) -> ModelPage:
        request = management_pb2.ListModelsRequest(limit=limit, next_page_token=next_page_token)
        return model_page(self._call(self.stub.ListModels, request))

    def describe(
        self,
        name: str,
        version: str | None = None,
        *,
        all_versions: bool = False,
        customized: bool = False,
    ) -> list[dict[str, Any]]:
        request = management_pb2.DescribeModelRequest(
            model_name=name,
            model_version="all" if all_versions else version or "",
            customized=customized,
        )
        return descriptions(self._call(self.stub.DescribeModel, request))

    def register(
        self,
        url: str,
        *,
        model_name: str | None = None,
        handler: str | None = None,
        runtime: str | None = None,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        response_timeout: int | None = None,
        startup_timeout: int | None = None,
    ) -> str:
        fields = _given(
            model_name=model_name,
            handler=handler,
            runtime=runtime,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
        )
        request = management_pb2.RegisterModelRequest(url=url, synchronous=synchronous, **fields)
        return self._status(self.stub.RegisterModel, request)

    def scale(
        self,
        name: str,
        min_workers: int,
        *,
        max_workers: int | None = None,
        version: str | None = None,
        synchronous: bool = True,
    ) -> str:
        request = management_pb2.ScaleWorkerRequest(
            model_name=name,
            min_worker=min_workers,
            synchronous=synchronous,
            **_given(model_version=version, max_worker=max_workers),
        )
        return self._status(self.stub.ScaleWorker, request)

    def unregister(self, name: str, version: str | None = None) -> str:
        request = management_pb2.UnregisterModelRequest(
            model_name=name, model_version=version or ""
        )
        return self._status(self.stub.UnregisterModel, request)

    def set_default(self, name: str, version: str) -> str:
        request = management_pb2.SetDefaultRequest(model_name=name, model_version=version)
        return self._status(self.stub.SetDefault, request)


class GrpcInferenceClient(InferenceClient):
    """The inference API over gRPC (`InferenceAPIsService`), with its streaming call."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 600,
        tls: TlsOptions | None = None,
    ) -> None:
        self.transport = GrpcClient(target, token, timeout, tls)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.transport.channel)

    def close(self) -> None:
        self.transport.close()

    def predict(
        self, model: str, inputs: bytes | Input | Sequence[Input], version: str | None = None
    ) -> Prediction:
        """The inputs are the request's `input` map, by name."""
        request = _request(model, inputs, version)
        return _prediction(self.transport.call(self.stub.Predictions, request).prediction)

    def stream(
        self, model: str, inputs: bytes | Input | Sequence[Input], version: str | None = None
    ) -> Iterator[Prediction]:
        """`StreamPredictions`: a streaming handler's answers, one per message, as they come."""
        request = _request(model, inputs, version)
        for answer in self.transport.stream(self.stub.StreamPredictions, request):
            yield _prediction(answer.prediction)

    def ping(self) -> str:
        answer = self.transport.call(self.stub.Ping, empty_pb2.Empty())
        return status_message(json.loads(answer.health))


def _request(model: str, inputs: bytes | Input | Sequence[Input], version: str | None) -> Any:
    given = {part.name: part.data for part in as_inputs(inputs)}
    return inference_pb2.PredictionsRequest(
        model_name=model, model_version=version or "", input=given
    )


def _prediction(body: bytes) -> Prediction:
    return Prediction(body, "application/json" if body[:1] in (b"{", b"[") else "")


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that are set: proto3 has no "unset" for a scalar, the server reads 0 so."""
    return {k: v for k, v in fields.items() if v is not None}


def _error(target: str, exc: grpc.RpcError) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    lowered = (details or "").lower()
    if code == grpc.StatusCode.UNAVAILABLE and "certificate_verify_failed" in lowered:
        return ServerUnreachable(
            f"cannot verify the TLS certificate of the gRPC server at {target} "
            "(--cacert FILE trusts the CA that signed it)"
        )
    if code == grpc.StatusCode.UNAVAILABLE and "handshake" in lowered:
        return ServerUnreachable(f"TLS handshake with the gRPC server at {target} failed")
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in lowered:
        return ServerUnreachable(f"cannot reach the gRPC server at {target}")
    name = code.name if code is not None else "UNKNOWN"
    return ApiError(f"{name}: {details}", code=name, detail=details or "")
