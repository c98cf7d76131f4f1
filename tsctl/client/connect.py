"""Build a client for the local server, or for a URL: REST or gRPC, with its key if needed.

On the machine that runs the server, its addresses and key file come from its pid file
(`tsctl.local`), so `tsctl models list` or `tsctl infer` need no flags even with token
authorization on: the key is read from the key file, and one that is about to expire is
rotated first with the API key. A URL that is not the local server's gets no key.

    from tsctl.client import connect_inference, connect_management

    with connect_management() as client:  # the local server, over REST
        print(client.all_models())
    with connect_inference("127.0.0.1:7070", grpc=True) as client:
        print(client.predict("resnet_faces", image_bytes).json())

A server that uses TLS is recorded (and given) as `https://host:port`, for gRPC too; its
certificate is checked against the system's CAs unless `tls` says otherwise
(`TlsOptions(cacert=...)` for a private CA, `TlsOptions(insecure=True)`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from tsctl.client.base import InferenceClient, ManagementClient
from tsctl.client.rest import RestInferenceClient, RestManagementClient
from tsctl.client.tls import TlsOptions
from tsctl.local.keys import expires_soon, read_key
from tsctl.local.lifecycle import running
from tsctl.local.pidfile import PidInfo, default_state_dir

if TYPE_CHECKING:
    from tsctl.client.grpc_client import GrpcInferenceClient, GrpcManagementClient

Api = Literal["inference", "management"]

#: where TorchServe's APIs listen by default, when no server is recorded and no URL given
DEFAULTS: dict[Api, str] = {
    "inference": "http://127.0.0.1:8080",
    "management": "http://127.0.0.1:8081",
}
GRPC_DEFAULTS: dict[Api, str] = {"inference": "127.0.0.1:7070", "management": "127.0.0.1:7071"}

#: a key that expires within this is rotated before use
_MARGIN = timedelta(seconds=30)


def connect_management(
    url: str | None = None,
    *,
    grpc: bool = False,
    timeout: float = 600,
    info: PidInfo | None = None,
    tls: TlsOptions | None = None,
) -> ManagementClient:
    """A management client for `url`, or for the local server (`info`, or the one recorded
    in the default state directory), over REST or gRPC."""
    if grpc:
        return connect_grpc_management(url, timeout=timeout, info=info, tls=tls)
    target, token = _rest_target("management", url, timeout, info, tls)
    return RestManagementClient(target, timeout=timeout, token=token, tls=tls)


def connect_inference(
    url: str | None = None,
    *,
    grpc: bool = False,
    timeout: float = 600,
    info: PidInfo | None = None,
    tls: TlsOptions | None = None,
) -> InferenceClient:
    """An inference client for `url`, or for the local server, over REST or gRPC."""
    if grpc:
        return connect_grpc_inference(url, timeout=timeout, info=info, tls=tls)
    target, token = _rest_target("inference", url, timeout, info, tls)
    return RestInferenceClient(target, timeout=timeout, token=token, tls=tls)


def connect_grpc_management(
    url: str | None = None,
    *,
    timeout: float = 600,
    info: PidInfo | None = None,
    tls: TlsOptions | None = None,
) -> GrpcManagementClient:
    from tsctl.client.grpc_client import GrpcManagementClient

    target, token = _grpc_target("management", url, timeout, info, tls)
    return GrpcManagementClient(target, token=token, timeout=timeout, tls=tls)


def connect_grpc_inference(
    url: str | None = None,
    *,
    timeout: float = 600,
    info: PidInfo | None = None,
    tls: TlsOptions | None = None,
) -> GrpcInferenceClient:
    """The gRPC inference client (it can also stream a handler's answers)."""
    from tsctl.client.grpc_client import GrpcInferenceClient

    target, token = _grpc_target("inference", url, timeout, info, tls)
    return GrpcInferenceClient(target, token=token, timeout=timeout, tls=tls)


def _local(info: PidInfo | None) -> PidInfo | None:
    return info if info is not None else running(default_state_dir())


def _rest_target(
    api: Api, url: str | None, timeout: float, info: PidInfo | None, tls: TlsOptions | None
) -> tuple[str, str | None]:
    info = _local(info)
    recorded = ""
    if info is not None:
        recorded = info.inference_address if api == "inference" else info.management_address
    target = url or recorded or DEFAULTS[api]
    token = None
    if info is not None and info.key_file and _same(target, recorded):
        token = _fresh_key(info, api, timeout, tls)
    return target, token


def _grpc_target(
    api: Api, url: str | None, timeout: float, info: PidInfo | None, tls: TlsOptions | None
) -> tuple[str, str | None]:
    info = _local(info)
    recorded = ""
    if info is not None:
        recorded = (
            info.grpc_inference_address if api == "inference" else info.grpc_management_address
        )
    target = (url or recorded or GRPC_DEFAULTS[api]).removeprefix("http://")
    token = None
    if info is not None and info.key_file and recorded and _same(target, recorded):
        token = _fresh_key(info, api, timeout, tls)
    return target, token


def _same(a: str, b: str) -> bool:
    """Whether two addresses (`scheme://host:port` or `host:port`) name the same server."""
    first = urlsplit(a if "://" in a else f"http://{a}")
    second = urlsplit(b if "://" in b else f"http://{b}")
    local = {"localhost", "127.0.0.1"}
    hosts_match = first.hostname == second.hostname or {first.hostname, second.hostname} <= local
    return hosts_match and first.port == second.port


def _fresh_key(info: PidInfo, kind: Api, timeout: float, tls: TlsOptions | None) -> str | None:
    """The local server's key of `kind`, rotated first (over REST) when about to expire."""
    if expires_soon(info.key_file, kind, _MARGIN):
        api_key = read_key(info.key_file, "API")
        with RestManagementClient(info.management_address, timeout, api_key, tls) as admin:
            admin.rotate_key(kind)
    return read_key(info.key_file, kind)
