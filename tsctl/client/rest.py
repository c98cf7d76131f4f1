"""A small blocking REST client for the inference and management APIs (stdlib only).

`RestClient` keeps one HTTP/1.1 connection; make one per thread for concurrent requests.
Failures come back as `ApiError` (the server answered non-2xx; `message` is its own) or
`ServerUnreachable` (no answer at all).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from tsctl.errors import ServerUnreachable, TsctlError


class ApiError(TsctlError):
    """The server answered with an error status; `message` is what it said."""

    def __init__(self, status: int, message: str, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


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
    def __init__(self, base_url: str, timeout: float = 300, token: str | None = None) -> None:
        parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if parts.scheme != "http" or not parts.hostname:
            raise TsctlError(f"unsupported server URL {base_url!r}; use http://host:port")
        self.base_url = f"http://{parts.hostname}:{parts.port or 80}"
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
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
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ServerUnreachable(
                    f"cannot reach the server at {self.base_url}: {reason}"
                ) from None
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        if reply.status >= 400:
            raise ApiError(reply.status, _error_message(reply), data)
        return reply

    def predict(
        self,
        model: str,
        files: Sequence[Path],
        version: str | None = None,
        content_type: str | None = None,
    ) -> Reply:
        """One request: a single file as the raw body, several as one multipart request."""
        path = f"/predictions/{quote(model, safe='')}"
        if version:
            path += f"/{quote(version, safe='')}"
        if len(files) == 1:
            body = files[0].read_bytes()
            ctype = content_type or guess_type(files[0])
            return self.request("POST", path, body, {"Content-Type": ctype})
        body, ctype = multipart(files, content_type)
        return self.request("POST", path, body, {"Content-Type": ctype})


def guess_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def multipart(files: Sequence[Path], content_type: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with one part per file, named after the file."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    used: set[str] = set()
    for path in files:
        name = path.name
        n = 1
        while name in used:
            n += 1
            name = f"{path.name}.{n}"
        used.add(name)
        ctype = content_type or guess_type(path)
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{path.name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
        )
        chunks.append(path.read_bytes())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _error_message(reply: Reply) -> str:
    try:
        doc = json.loads(reply.body)
        if isinstance(doc, dict) and "message" in doc:
            kind = doc.get("type", "")
            return f"{reply.status} {kind}: {doc['message']}" if kind else str(doc["message"])
    except ValueError:
        pass
    text = reply.body.decode("utf-8", "replace").strip()
    return f"{reply.status}: {text[:500]}" if text else f"the server answered {reply.status}"
