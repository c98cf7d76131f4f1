"""Clients for a running tsctl (or TorchServe) server, usable as a library.

`connect_management()` and `connect_inference()` give a `ManagementClient` or an
`InferenceClient` for the local server or a URL, over REST or (`grpc=True`) gRPC; both
implementations take the same arguments and answer the same results and errors (`ApiError`).
The gRPC implementations live in `tsctl.client.grpc_client`, which imports grpc.
"""

from tsctl.client.base import (
    ApiError,
    InferenceClient,
    Input,
    ManagementClient,
    ModelEntry,
    ModelPage,
    Prediction,
    file_inputs,
)
from tsctl.client.connect import (
    connect_grpc_inference,
    connect_grpc_management,
    connect_inference,
    connect_management,
)
from tsctl.client.tls import TlsOptions
from tsctl.errors import ServerUnreachable

__all__ = [
    "ApiError",
    "InferenceClient",
    "Input",
    "ManagementClient",
    "ModelEntry",
    "ModelPage",
    "Prediction",
    "ServerUnreachable",
    "TlsOptions",
    "connect_grpc_inference",
    "connect_grpc_management",
    "connect_inference",
    "connect_management",
    "file_inputs",
]
