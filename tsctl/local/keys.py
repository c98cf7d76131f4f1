"""The daemon's key file, as the clients on this machine read it (TorchServe's format).

The daemon (`tsctl.server.auth`) writes `key_file.json`: for each kind of key (`management`,
`inference`, `API`) an object with the `key` and, for the first two, its `expiration time` in
`EXPIRY_FORMAT`, local time. The CLI and `tsctl.client.connect` read it so that local use
needs no flags. Standard library only.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

#: the key file's name, in the directory the daemon was started from
KEY_FILE = "key_file.json"
#: how an `expiration time` is written (local time, as TorchServe writes it)
EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%S"


def read_key(key_file: str | Path, kind: str) -> str | None:
    """A key from a key file (for the CLI talking to its local server), or None."""
    try:
        doc = json.loads(Path(key_file).read_text(encoding="utf-8"))
        value = doc[kind]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(value)


def expires_soon(key_file: str | Path, kind: str, margin: timedelta = timedelta(0)) -> bool:
    """True when the key of `kind` expires within `margin` (False when it never expires or
    the file cannot be read)."""
    try:
        doc = json.loads(Path(key_file).read_text(encoding="utf-8"))
        raw = doc[kind].get("expiration time")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if not raw:
        return False
    return datetime.strptime(raw, EXPIRY_FORMAT) <= datetime.now() + margin
