"""TLS for the daemon's APIs: the key and certificate, read and checked once at start-up.

TorchServe's settings: `private_key_file` + `certificate_file` (PEM), or a PKCS12 `keystore`
+ `keystore_pass` (+ `keystore_type=PKCS12`). An API listens with TLS when its address is
`https://...` (the three HTTP APIs) or, for both gRPC APIs, when `enable_grpc_ssl` is true.

`load` reads the files, checks them and returns the key and chain as PEM bytes (`Material`);
every problem is an `InvalidInput` whose one line names the file and what is wrong, and the
daemon refuses to start with it:

- a key file (or keystore) that other users may read (the "others" read bit; group-readable
  is allowed, for deployments that share keys through a group such as Debian's `ssl-cert`);
- a file that cannot be read, is not PEM (or not PKCS12 with that password), holds an
  encrypted PEM key, or a key that does not match the certificate;
- an RSA key under 2048 bits, an elliptic curve under 224 bits (too weak), a DSA key.

`server_context` builds the `ssl.SSLContext` the HTTP APIs use: TLS 1.2 and 1.3 only, forward
secret AEAD ciphers only (ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3's own suites), no
compression, no renegotiation. Python's `ssl` loads a key only from a file: PKCS12 material is
written to a private temporary file (mode 0600, in a fresh 0700 directory) that is deleted as
soon as it is loaded. gRPC takes the PEM bytes directly (`grpc.ssl_server_credentials`).

Runs once, on the daemon's loop before any API listens (small local files: it may block).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsctl.errors import InvalidInput

if TYPE_CHECKING:
    from tsctl.server.config import ServerConfig

#: TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3's suites are all of this kind)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:@SECLEVEL=2"
#: the smallest keys accepted, in bits
MIN_RSA_BITS = 2048
MIN_EC_BITS = 224
#: the largest key, certificate or keystore file read
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Material:
    """A private key and its certificate chain (leaf first), PEM-encoded."""

    key_pem: bytes
    chain_pem: bytes
    #: where it came from, for log lines
    source: str


def wanted(config: ServerConfig) -> bool:
    """Whether any API of `config` listens with TLS."""
    addresses = [config.inference_address, config.management_address]
    if config.enable_metrics_api:
        addresses.append(config.metrics_address)
    return config.enable_grpc_ssl or any(a.startswith("https://") for a in addresses)


def load(config: ServerConfig) -> Material | None:
    """The key and certificate for the TLS APIs of `config`, checked; None when no API uses
    TLS. Raises `InvalidInput` (one line naming the file) for anything wrong."""
    if not wanted(config):
        return None
    if config.keystore is not None:
        return _from_keystore(config)
    if config.private_key_file is None or config.certificate_file is None:
        raise InvalidInput(
            "TLS is on (an https:// address or enable_grpc_ssl) but no key is configured: "
            "set private_key_file and certificate_file (PEM), or keystore and keystore_pass"
        )
    key_path, cert_path = config.private_key_file, config.certificate_file
    key_pem = _read(key_path, "private_key_file", private=True)
    chain_pem = _read(cert_path, "certificate_file", private=False)
    key = _pem_key(key_pem, key_path)
    certs = _pem_certs(chain_pem, cert_path)
    _check_pair(key, certs[0], f"private_key_file {key_path}", f"certificate_file {cert_path}")
    return Material(_key_pem(key), _chain_pem(certs), f"{key_path} and {cert_path}")


def server_context(material: Material) -> ssl.SSLContext:
    """A server-side context for the HTTP APIs (see the module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="tsctl-tls-") as folder:  # created 0700
        path = Path(folder) / "key-and-chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(material.key_pem + material.chain_pem)
            context.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise InvalidInput(f"TLS key and certificate {material.source}: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    return context


def _read(path: Path, setting: str, private: bool) -> bytes:
    """A key, certificate or keystore file's bytes; a private one that other users may read
    is refused (checked on the opened file, so it is the file that is read)."""
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"{setting} {path}: not a regular file")
            if private and st.st_mode & stat.S_IROTH:
                raise InvalidInput(
                    f"{setting} {path} may be read by any user (mode "
                    f"{stat.S_IMODE(st.st_mode):o}): refusing to use it; chmod o-r (600 is best)"
                )
            data = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {setting} {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise InvalidInput(f"{setting} {path}: over {MAX_FILE >> 20} MiB, not a key file")
    return data


def _pem_key(data: bytes, path: Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    where = f"private_key_file {path}"
    if b"-----BEGIN" not in data:
        raise InvalidInput(f"{where}: not a PEM file (no -----BEGIN line)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a password is needed
        raise InvalidInput(
            f"{where}: the key is encrypted; tsctl needs it unencrypted (or use a keystore)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"{where}: not a usable PEM private key ({_reason(exc)})") from None
    _check_strength(key, where)
    return key


def _pem_certs(data: bytes, path: Path) -> list[Any]:
    from cryptography import x509

    where = f"certificate_file {path}"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidInput(f"{where}: no PEM certificate in it (no BEGIN CERTIFICATE line)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidInput(f"{where}: not a valid PEM certificate ({_reason(exc)})") from None


def _from_keystore(config: ServerConfig) -> Material:
    from cryptography.hazmat.primitives.serialization import pkcs12

    path = config.keystore
    assert path is not None
    kind = config.keystore_type.strip().upper()
    where = f"keystore {path}"
    if kind not in ("PKCS12", "P12", "PFX"):
        raise InvalidInput(
            f"{where}: keystore_type {config.keystore_type!r} is not supported (PKCS12 is); "
            "convert it with keytool -importkeystore -deststoretype PKCS12"
        )
    data = _read(path, "keystore", private=True)
    password = config.keystore_pass.encode() if config.keystore_pass else None
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as exc:
        raise InvalidInput(
            f"{where}: cannot read it as PKCS12 with keystore_pass ({_reason(exc)})"
        ) from None
    if key is None or cert is None:
        raise InvalidInput(f"{where}: it must hold a private key and its certificate")
    _check_strength(key, where)
    _check_pair(key, cert, where, where)
    return Material(_key_pem(key), _chain_pem([cert, *extra]), str(path))


def _check_strength(key: Any, where: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidInput(
                f"{where}: a {key.key_size}-bit RSA key is too weak; "
                f"use {MIN_RSA_BITS} bits or more (or an EC key)"
            )
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size < MIN_EC_BITS:
            raise InvalidInput(f"{where}: the {key.curve.name} curve is too weak; use P-256")
    elif not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise InvalidInput(f"{where}: a {type(key).__name__} cannot serve TLS; use RSA or EC")


def _check_pair(key: Any, cert: Any, key_where: str, cert_where: str) -> None:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise InvalidInput(f"{key_where} does not match the certificate in {cert_where}")


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _chain_pem(certs: list[Any]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(bytes(c.public_bytes(serialization.Encoding.PEM)) for c in certs)


def _reason(exc: BaseException) -> str:
    """An exception's first line, short (cryptography's messages can run long)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
