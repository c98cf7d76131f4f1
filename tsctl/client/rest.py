"""The client library over REST (TorchServe's paths and JSON), standard library only.

`RestClient` is the transport: one HTTP/1.1 connection, kept alive; make one per thread for
concurrent requests. `RestManagementClient` and `RestInferenceClient` implement the library's
interface (`tsctl.client.base`) on it. Failures come back as `ApiError` (the server answered
non-2xx; `detail` is its own message) or `ServerUnreachable` (no answer at all).
"""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

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
)
from tsctl.client.tls import TlsOptions, unverified
from tsctl.errors import ServerUnreachable, TsctlError

__all__ = ["ApiError", "Reply", "RestClient", "RestInferenceClient", "RestManagementClient"]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> object:
        return json.loads(self.body)


class RestClient:
    """One connection to one API at `base_url` (`http://host:port` or `https://host:port`),
    with the key if given; `tls` says how an https server's certificate is checked."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 300,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TsctlError(
                f"unsupported server URL {base_url!r}; use http://host:port or https://host:port"
            )
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        if parts.scheme == "https":
            port = parts.port or 443
            context = (tls or TlsOptions()).ssl_context()
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context
            )
        else:
            port = parts.port or 80
            self._conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.base_url = f"{parts.scheme}://{shown}:{port}"
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def close(self) -> None:
        self._conn.close()

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        for attempt in (1, 2):
            try:
                self._conn.request(
                    method, path, body=body, headers={**self._auth, **(headers or {})}
                )
                response = self._conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._conn.close()  # a kept-alive connection the server closed: retry once
                if attempt == 2:
                    raise ServerUnreachable(
                        f"the server at {self.base_url} closed the connection"
                    ) from None
            except ssl.SSLCertVerificationError as exc:
                raise unverified(self.base_url, exc) from None
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ServerUnreachable(
                    f"cannot reach the server at {self.base_url}: {reason}"
                ) from None
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        if reply.status >= 400:
            raise _error(reply)
        return reply


class RestManagementClient(ManagementClient):
    """The management API over REST (`/models...`)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 300,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.transport = RestClient(base_url, timeout, token, tls)

    def close(self) -> None:
        self.transport.close()

    def _call(self, method: str, path: str, **query: Any) -> object:
        return self.transport.request(method, path + _query(**query)).json()

    def list_models(self, limit: int = 100, next_page_token: int = 0) -> ModelPage:
        return model_page(
            self._call("GET", "/models", limit=limit, next_page_token=next_page_token)
        )

    def describe(
        self,
        name: str,
        version: str | None = None,
        *,
        all_versions: bool = False,
        customized: bool = False,
    ) -> list[dict[str, Any]]:
        path = _path(name, "all" if all_versions else version)
        return descriptions(self._call("GET", path, customized=customized or None))

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
        doc = self._call(
            "POST",
            "/models",
            url=url,
            model_name=model_name,
            handler=handler,
            runtime=runtime,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            synchronous=synchronous,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
        )
        return status_message(doc)

    def scale(
        self,
        name: str,
        min_workers: int,
        *,
        max_workers: int | None = None,
        version: str | None = None,
        synchronous: bool = True,
    ) -> str:
        doc = self._call(
            "PUT",
            _path(name, version),
            min_worker=min_workers,
            max_worker=max_workers,
            synchronous=synchronous,
        )
        return status_message(doc)

    def unregister(self, name: str, version: str | None = None) -> str:
        return status_message(self._call("DELETE", _path(name, version)))

    def set_default(self, name: str, version: str) -> str:
        return status_message(self._call("PUT", _path(name, version) + "/set-default"))

    def rotate_key(self, kind: str) -> dict[str, str]:
        """A new `management` or `inference` key (`/token?type=KIND`; needs the API key)."""
        doc = self._call("GET", "/token", type=kind)
        entry = doc.get(kind) if isinstance(doc, dict) else None
        return {str(k): str(v) for k, v in entry.items()} if isinstance(entry, dict) else {}


class RestInferenceClient(InferenceClient):
    """The inference API over REST (`/predictions/...`, `/ping`)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 300,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.transport = RestClient(base_url, timeout, token, tls)

    def close(self) -> None:
        self.transport.close()

    def predict(
        self, model: str, inputs: bytes | Input | Sequence[Input], version: str | None = None
    ) -> Prediction:
        """One input is the raw body, several one multipart/form-data request."""
        parts = as_inputs(inputs)
        path = _path(model, version, base="/predictions")
        if len(parts) == 1:
            body, ctype = parts[0].data, parts[0].content_type
        else:
            body, ctype = multipart(parts)
        reply = self.transport.request("POST", path, body, {"Content-Type": ctype})
        return Prediction(reply.body, reply.content_type, reply.status)

    def ping(self) -> str:
        return status_message(self.transport.request("GET", "/ping").json())


def multipart(inputs: Sequence[Input]) -> tuple[bytes, str]:
    """A multipart/form-data body with one part per input."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for part in inputs:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{part.name}"; '
            f'filename="{part.filename or part.name}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n".encode()
        )
        chunks.append(part.data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _path(name: str, version: str | None = None, base: str = "/models") -> str:
    path = f"{base}/{quote(name, safe='')}"
    return f"{path}/{quote(version, safe='')}" if version else path


def _query(**values: Any) -> str:
    """A query string of the values that are not None (booleans as `true`/`false`)."""
    given = {k: str(v).lower() if isinstance(v, bool) else v for k, v in values.items()}
    present = {k: v for k, v in given.items() if v is not None}
    return f"?{urlencode(present)}" if present else ""


def _error(reply: Reply) -> ApiError:
    try:
        doc = json.loads(reply.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "message" in doc:
        kind, detail = str(doc.get("type", "")), str(doc["message"])
        message = f"{reply.status} {kind}: {detail}" if kind else detail
        return ApiError(message, status=reply.status, detail=detail, kind=kind, body=reply.body)
    text = reply.body.decode("utf-8", "replace").strip()
    message = f"{reply.status}: {text[:500]}" if text else f"the server answered {reply.status}"
    return ApiError(message, status=reply.status, detail=text, body=reply.body)
