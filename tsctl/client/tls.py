"""How a client checks a TLS server (`https://` addresses, REST and gRPC alike).

By default the server's certificate must chain to the system's trusted CAs and name the host
the client connects to. `cacert` trusts a private CA (or a self-signed certificate) instead;
`insecure` skips the check entirely (REST only: gRPC's TLS always verifies, so a gRPC client
needs `cacert` for a private CA). The library never prints: the CLI warns about `insecure`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tsctl.errors import InvalidInput, ServerUnreachable

if TYPE_CHECKING:
    import grpc


@dataclass(frozen=True)
class TlsOptions:
    """`cacert`: a PEM file of the CA certificates to trust instead of the system's;
    `insecure`: do not verify the server's certificate at all."""

    cacert: Path | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        """The context for an https:// connection (TLS 1.2 and up)."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.cacert) if self.cacert is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot use --cacert {self.cacert}: {_reason(exc)}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials for a gRPC server that uses TLS."""
        import grpc

        if self.insecure:
            raise InvalidInput(
                "gRPC over TLS always verifies the server's certificate: "
                "pass --cacert with the CA that signed it instead of --insecure"
            )
        roots = None
        if self.cacert is not None:
            try:
                roots = self.cacert.read_bytes()
            except OSError as exc:
                raise InvalidInput(f"cannot read --cacert {self.cacert}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(root_certificates=roots)


def unverified(base_url: str, exc: ssl.SSLCertVerificationError) -> ServerUnreachable:
    """The error for a server whose certificate could not be verified."""
    reason = exc.verify_message or _reason(exc)
    return ServerUnreachable(
        f"cannot verify the TLS certificate of {base_url}: {reason} "
        "(--cacert FILE trusts the CA that signed it; --insecure skips the check)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
