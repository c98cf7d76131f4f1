"""The `--cacert` and `--insecure` options the client commands share (`infer`, `models`,
`serve status`), and the warning `--insecure` prints (once per command: each command calls
`tls_options` once)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tsctl.client.tls import TlsOptions

CACERT_HELP = "With https: trust the CA certificates in this PEM file (default: the system's)."
INSECURE_HELP = "With https: do not verify the server's certificate (REST only; warns)."


def tls_options(cacert: Path | None, insecure: bool) -> TlsOptions | None:
    """The client's TLS options from the flags (None: the defaults)."""
    if cacert is None and not insecure:
        return None
    from tsctl.client.tls import TlsOptions

    if insecure:
        sys.stderr.write(
            "tsctl: warning: --insecure: the server's TLS certificate is not verified\n"
        )
    return TlsOptions(cacert=cacert, insecure=insecure)
