"""The one place requests are authorized: a chain of `Authorizer`s (`run_chain`), and
TorchServe's token authorization, the built-in one (`TokenAuthorizer`).

The chain is the token authorizer (when token authorization is on), then the plugin
authorizers in the order they were loaded; all must allow. A plugin's `Denied` becomes an
`AccessDenied` error with its status and message (gRPC: 401 UNAUTHENTICATED, 403
PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED, any other PERMISSION_DENIED); an authorizer that
raises (or answers something that is not a `Denied`) fails that request alone with a 500 whose
message names nothing of it, and its name and traceback go to ts_log.log. Health checks never
reach here (their adapters do not call `authorize`).

Token authorization, as TorchServe 0.12 does it: at start the daemon writes `key_file.json`
(mode 0600) in the directory it was started from, with three keys: `management`, `inference`
(each with an expiration time) and `API` (used only to rotate the other two through
`/token?type=management|inference`). Requests carry `Authorization: Bearer <key>`. Health
checks (`/ping`) never need a key: load-balancer probes cannot carry one. The metrics API needs
none either. `--disable-token-auth` or `disable_token_authorization=true` turn it off.

Event-loop only (authorizers must not block); the key file is small and written atomically.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tsctl.errors import TsctlError
from tsctl.local.keys import EXPIRY_FORMAT, KEY_FILE
from tsctl.plugins.api import Authorizer, Denied, RequestInfo

log = logging.getLogger("tsctl.server")

#: TorchServe's answer to a missing, wrong or expired key (the `/token` API says
#: "Authentication" where the others say "Authorization", as TorchServe does)
FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
TOKEN_API_FAILED = FAILED.replace("Authorization", "Authentication", 1)


class Unauthorized(TsctlError):
    """TorchServe answers 400 `InvalidKeyException` (its tests and clients check for 400), not
    HTTP's 401; gRPC gets UNAUTHENTICATED."""

    exit_code = 1
    http_status = 400
    grpc_code = "UNAUTHENTICATED"
    type_name = "InvalidKeyException"


class AccessDenied(TsctlError):
    """A plugin authorizer's `Denied`: its status and message (`refusal` gives each status a
    class of its own, so the REST and gRPC funnels answer it as any other error)."""

    exit_code = 1
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    type_name = "AccessDeniedException"


#: a denial's gRPC code by its HTTP status (any other: PERMISSION_DENIED)
GRPC_CODES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}
#: what a client is told when an authorizer fails (its name and traceback are in ts_log.log)
AUTHORIZER_FAILED = (
    "internal server error: the request could not be authorized; "
    "the server log (ts_log.log) has the details"
)


@functools.cache
def _denied_class(status: int) -> type[AccessDenied]:
    """The error class of one denial status (at most 200 of them: 400 to 599)."""
    code = GRPC_CODES.get(status, "PERMISSION_DENIED")
    return type(
        f"AccessDenied{status}", (AccessDenied,), {"http_status": status, "grpc_code": code}
    )


@dataclass(frozen=True)
class TokenDenied(Denied):
    """The token authorizer's refusal: answered as TorchServe does (`Unauthorized`)."""

    status: int = Unauthorized.http_status
    message: str = FAILED


def refusal(denied: Denied) -> TsctlError:
    """The error that answers `denied` (the caller checked it is a `Denied`)."""
    if isinstance(denied, TokenDenied):
        return Unauthorized(denied.message)
    return _denied_class(denied.status)(denied.message)


def _valid(denied: object) -> bool:
    """Whether an authorizer's answer is a usable `Denied` (a status from 400 to 599, a
    message that is a string)."""
    if not isinstance(denied, Denied):
        return False
    status = denied.status
    return type(status) is int and 400 <= status <= 599 and isinstance(denied.message, str)


def run_chain(chain: Sequence[Authorizer], request: RequestInfo) -> None:
    """Ask each authorizer of `chain` in turn: return when all allow, raise the error of the
    first that denies (`refusal`), or a 500 for one that raises or answers nonsense."""
    for authorizer in chain:
        try:
            denied = authorizer.authorize(request)
        except Exception:  # a plugin may raise anything: the request fails, never the server
            log.exception(
                "authorizer %s failed on %s %s %s (%s API)",
                authorizer.name,
                request.protocol,
                request.method,
                request.path,
                request.api,
            )
            raise TsctlError(AUTHORIZER_FAILED) from None
        if denied is None:
            continue
        if not _valid(denied):
            if inspect.iscoroutine(denied):
                denied.close()  # an `async def authorize`: it must be a plain function
            log.error(
                "authorizer %s answered %r on %s %s %s: not None or a Denied with a status "
                "from 400 to 599 and a str message (authorize is a plain function)",
                authorizer.name,
                denied,
                request.protocol,
                request.method,
                request.path,
            )
            raise TsctlError(AUTHORIZER_FAILED)
        raise refusal(denied)


@dataclass
class Key:
    value: str
    expires: float  # epoch seconds; 0 = never


def _new_key(minutes: float) -> Key:
    return Key(secrets.token_urlsafe(24), time.time() + minutes * 60 if minutes > 0 else 0)


@dataclass
class TokenAuth:
    path: Path
    minutes: float
    keys: dict[str, Key] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, minutes: float) -> TokenAuth:
        auth = cls(directory.resolve() / KEY_FILE, minutes)
        auth.keys = {
            "management": _new_key(minutes),
            "inference": _new_key(minutes),
            "API": _new_key(0),
        }
        auth.save()
        return auth

    def save(self) -> None:
        doc: dict[str, Any] = {}
        for kind, key in self.keys.items():
            entry: dict[str, str] = {"key": key.value}
            if key.expires:
                expiry = datetime.fromtimestamp(key.expires)
                entry["expiration time"] = expiry.strftime(EXPIRY_FORMAT)
            doc[kind] = entry
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, self.path)

    def check(self, kind: str, authorization: str | None) -> None:
        """Allow the request, or raise `Unauthorized` with TorchServe's message."""
        message = TOKEN_API_FAILED if kind == "API" else FAILED
        key = self.keys[kind]
        scheme, _, given = (authorization or "").partition(" ")
        # as bytes: `compare_digest` raises on a str that is not ASCII (a header of latin-1
        # bytes, or gRPC metadata of any text); surrogatepass encodes any str
        offered = given.strip().encode("utf-8", "surrogatepass")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered, key.value.encode()):
            raise Unauthorized(message)
        if key.expires and time.time() > key.expires:
            raise Unauthorized(message)

    def rotate(self, kind: str) -> dict[str, str]:
        self.keys[kind] = _new_key(self.minutes)
        self.save()
        key = self.keys[kind]
        expiry = datetime.fromtimestamp(key.expires).strftime(EXPIRY_FORMAT) if key.expires else ""
        return {"key": key.value, "expiration time": expiry}


class TokenAuthorizer(Authorizer):
    """TorchServe's token authorization on the `Authorizer` interface: the inference API
    needs the `inference` key, the management API the `management` key, and its `/token`
    path the `API` key (`Authorization: Bearer <key>`; gRPC: `authorization` metadata). The
    metrics API needs none, as in TorchServe."""

    name = "token"

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    def authorize(self, request: RequestInfo) -> Denied | None:
        api = request.api
        if api == "metrics":
            return None
        if api == "management" and request.path == "/token" and request.protocol == "http":
            api = "API"
        try:
            self.auth.check(api, request.headers.get("authorization"))
        except Unauthorized as exc:
            return TokenDenied(message=exc.message)
        return None
