"""Reach the local server from the CLI: its addresses and keys come from its pid file.

So `tsctl models list` or `tsctl infer` need no flags on the machine that runs the server,
even with token authorization on: the key is read from the server's key file, and one that is
about to expire is rotated first with the API key.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from tsctl.client.rest import RestClient
from tsctl.local.lifecycle import running
from tsctl.local.pidfile import PidInfo, default_state_dir
from tsctl.server.auth import expires_soon, read_key

DEFAULTS = {"inference": "http://127.0.0.1:8080", "management": "http://127.0.0.1:8081"}


def _address(info: PidInfo, api: str) -> str:
    return info.inference_address if api == "inference" else info.management_address


def _same(a: str, b: str) -> bool:
    first, second = urlsplit(a if "://" in a else f"http://{a}"), urlsplit(b)
    local = {"localhost", "127.0.0.1"}
    hosts_match = first.hostname == second.hostname or {first.hostname, second.hostname} <= local
    return hosts_match and first.port == second.port


def connect(
    api: str, url: str | None = None, timeout: float = 600, info: PidInfo | None = None
) -> RestClient:
    """A client for `api` ("inference" or "management") at `url`, or at the local server
    (`info`, or the one recorded in the default state directory)."""
    info = info or running(default_state_dir())
    target = url or (_address(info, api) if info else DEFAULTS[api])
    token = None
    if info is not None and info.key_file and _same(target, _address(info, api)):
        token = _fresh_key(info, api, timeout)
    return RestClient(target, timeout=timeout, token=token)


def _fresh_key(info: PidInfo, kind: str, timeout: float) -> str | None:
    if expires_soon(info.key_file, kind, timedelta(seconds=30)):
        api_key = read_key(info.key_file, "API")
        admin = RestClient(info.management_address, timeout=timeout, token=api_key)
        try:
            admin.request("GET", f"/token?type={kind}")
        finally:
            admin.close()
    return read_key(info.key_file, kind)


GRPC_DEFAULTS = {"inference": "127.0.0.1:7070", "management": "127.0.0.1:7071"}


def connect_grpc(api: str, url: str | None = None, timeout: float = 600) -> Any:
    """A gRPC client for `api` at `url`, or at the local server, with its key if needed."""
    from tsctl.client.grpc_client import GrpcClient

    info = running(default_state_dir())
    recorded = ""
    if info is not None:
        recorded = (
            info.grpc_inference_address if api == "inference" else info.grpc_management_address
        )
    target = (url or recorded or GRPC_DEFAULTS[api]).removeprefix("http://")
    token = None
    if info is not None and info.key_file and recorded and _same(target, f"http://{recorded}"):
        token = _fresh_key(info, api, timeout)
    return GrpcClient(target, token=token, timeout=timeout)
