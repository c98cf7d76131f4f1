"""An authorizer for tsctl: every request carries an API key (`X-Api-Key` header; gRPC:
`x-api-key` metadata), checked against a file of SHA-256 hashes of the valid keys, each with
the models it may use.

The file (its path in the environment variable `TSCTL_API_KEYS`) is JSON, an object from the
hex SHA-256 of each key to the list of model names it may use (`"*"`: every model):

    {"9f86d08188...": ["*"], "60303ae22b...": ["mnist", "resnet-18"]}

It is read once, at the daemon's start (`setup`): a missing or invalid file stops the start
with one line saying what is wrong. Per request (on the daemon's event loop, so nothing here
blocks): no key → 401, a key not in the file → 401, a key whose models do not include the
request's model → 403; a request that names no model (`GET /models`, the metrics API) is
allowed for any valid key. The offered key's hash is compared with every stored hash with
`hmac.compare_digest`, without stopping at a match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from tsctl.plugins import Authorizer, Denied, RequestInfo, ServerView

#: the environment variable naming the keys file
ENV = "TSCTL_API_KEYS"
HEADER = "x-api-key"
ALL = "*"


class ApiKeyAuthorizer(Authorizer):
    name = "apikey"

    def __init__(self) -> None:
        self.keys: list[tuple[bytes, frozenset[str]]] = []

    def setup(self, server: ServerView) -> None:
        location = os.environ.get(ENV, "")
        if not location:
            raise ValueError(f"set {ENV} to the path of the API keys file (JSON)")
        self.keys = load_keys(Path(location))

    def authorize(self, request: RequestInfo) -> Denied | None:
        offered = request.headers.get(HEADER, "")
        if not offered:
            return Denied(401, "an API key is required: send it in the X-Api-Key header")
        digest = hashlib.sha256(offered.encode("utf-8", "surrogatepass")).digest()
        allowed: frozenset[str] | None = None
        for stored, models in self.keys:  # every one compared: the time tells nothing
            if hmac.compare_digest(digest, stored):
                allowed = models
        if allowed is None:
            return Denied(401, "the API key is not valid")
        model = request.model
        if model is None or ALL in allowed or model in allowed:
            return None
        return Denied(403, f"this API key may not use model {model!r}")


def load_keys(path: Path) -> list[tuple[bytes, frozenset[str]]]:
    """The (hash, allowed models) pairs of a keys file; `ValueError` saying what is wrong."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{ENV}: cannot read {str(path)!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{ENV}: {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{ENV}: {str(path)!r} must be an object of key hashes to model lists")
    keys = []
    for digest, models in doc.items():
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if len(raw) != hashlib.sha256().digest_size:
            raise ValueError(f"{ENV}: {digest!r} is not a SHA-256 hash in hex (64 digits)")
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{ENV}: the models of {digest[:12]}... must be a list of names")
        keys.append((raw, frozenset(models)))
    return keys
