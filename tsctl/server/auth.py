"""Token authorization, as TorchServe 0.12 does it, and the one place requests are authorized.

At start the daemon writes `key_file.json` (mode 0600) in the directory it was started from,
with three keys: `management`, `inference` (each with an expiration time) and `API` (used only
to rotate the other two through `/token?type=management|inference`). Requests carry
`Authorization: Bearer <key>`. Health checks (`/ping`) never need a key: load-balancer probes
cannot carry one. `--disable-token-auth` or `disable_token_authorization=true` turn it off.

Event-loop only; the key file is small and written atomically.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tsctl.errors import TsctlError
from tsctl.local.keys import EXPIRY_FORMAT, KEY_FILE

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
