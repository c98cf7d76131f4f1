"""TLS on every API of a real daemon, with certificates made at test time (`cryptography`): a
private CA and a server certificate for 127.0.0.1 and localhost.

What a user sees: the three HTTP APIs and both gRPC APIs over TLS (PEM files, or a PKCS12
keystore); only TLS 1.2 and up; a key file others may read, a weak key or a key that does not
match its certificate refused at start with one line naming the file; a TLS client on a plain
port and a plain client on a TLS port closed at once (never left waiting); and the CLI over
https with `--cacert`, with `--insecure`, and refusing a certificate it cannot verify.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.support.daemon import Server, make_archive

pytestmark = pytest.mark.slow

#: a bound on any one wait in these tests (a hang fails the test instead of stalling the run)
GUARD = 30.0
KEYSTORE_PASS = "changeit"


@dataclass(frozen=True)
class Pki:
    """A private CA and a server certificate signed by it, as files."""

    ca: Path
    cert: Path
    key: Path
    keystore: Path
    #: a second key, which matches no certificate here
    other_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tsctl test CA"))
        .issuer_name(_name("tsctl test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    keystore = pkcs12.serialize_key_and_certificates(
        b"tsctl",
        key,
        cert,
        [ca],
        serialization.BestAvailableEncryption(KEYSTORE_PASS.encode()),
    )
    other = ec.generate_private_key(ec.SECP256R1())
    return Pki(
        ca=folder / "ca.pem",
        cert=folder / "cert.pem",
        key=_private(folder / "key.pem", _key_pem(key)),
        keystore=_private(folder / "keystore.p12", keystore),
        other_key=_private(folder / "other.pem", _key_pem(other)),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_properties(**more: object) -> dict[str, object]:
    return {
        "inference_address": "https://127.0.0.1:0",
        "management_address": "https://127.0.0.1:0",
        "metrics_address": "https://127.0.0.1:0",
        **more,
    }


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    """Every API with TLS, from PEM files; token authorization on (the CLI brings the keys)."""
    props = tls_properties(
        private_key_file=pki.key, certificate_file=pki.cert, enable_grpc_ssl="true"
    )
    srv = Server(tmp_path_factory.mktemp("tls"), properties=props)
    make_archive(srv.store, "swiss", "swiss")
    srv.start("swiss.mar", auth=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("plain"))
    srv.start()
    yield srv
    srv.stop()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `tsctl: error:` line on stderr (no traceback, nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tsctl: error: "), result.stderr
    return lines[0]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://")[-1].rpartition(":")
    return host, int(port)


def https_get(address: str, path: str, ca: Path, token: str | None = None) -> tuple[int, bytes]:
    host, port = host_port(address)
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, port, timeout=GUARD, context=context)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def read_key(server: Server, kind: str) -> str:
    assert server.info is not None
    keys = json.loads(Path(server.info.key_file).read_text())
    return str(keys[kind]["key"])


def test_every_http_api_answers_over_tls(secured: Server, pki: Pki) -> None:
    info = secured.info
    assert info is not None
    assert info.inference_address.startswith("https://127.0.0.1:")
    assert info.management_address.startswith("https://")
    assert info.metrics_address.startswith("https://")
    status, body = https_get(info.inference_address, "/ping", pki.ca)
    assert (status, json.loads(body)) == (200, {"status": "Healthy"})
    token = read_key(secured, "management")
    status, body = https_get(info.management_address, "/models", pki.ca, token)
    assert status == 200 and json.loads(body)["models"][0]["modelName"] == "swiss"
    status, body = https_get(info.metrics_address, "/metrics", pki.ca)
    assert status == 200 and b"# TYPE" in body


def test_the_negotiated_protocol_is_tls12_or_newer(secured: Server, pki: Pki) -> None:
    assert secured.info is not None
    for address in (secured.info.inference_address, secured.info.management_address):
        context = ssl.create_default_context(cafile=str(pki.ca))
        with (
            socket.create_connection(host_port(address), timeout=GUARD) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def _old_tls_client() -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (its own security level lowered so that it
    really sends them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # old versions are deprecated: this client means it
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


@pytest.mark.parametrize("api", ["inference", "management"])
def test_tls_1_1_is_refused(secured: Server, api: str) -> None:
    assert secured.info is not None
    address = getattr(secured.info, f"{api}_address")
    with (
        socket.create_connection(host_port(address), timeout=GUARD) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        _old_tls_client().wrap_socket(raw)
    # the server refused the version (not the client failing to offer one)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value).upper()


def test_grpc_apis_over_tls_with_the_cli(secured: Server, pki: Pki, tmp_path: Path) -> None:
    assert secured.info is not None
    assert secured.info.grpc_inference_address.startswith("https://127.0.0.1:")
    assert secured.info.grpc_management_address.startswith("https://127.0.0.1:")
    listed = secured.tsctl("models", "list", "--grpc", "--json", "--cacert", pki.ca)
    assert listed.returncode == 0, listed.stderr
    assert [m["modelName"] for m in json.loads(listed.stdout)["models"]] == ["swiss"]
    data = tmp_path / "in.json"
    data.write_text('{"action": "echo"}')
    answered = secured.tsctl("infer", "swiss", data, "--grpc", "--cacert", pki.ca)
    assert answered.returncode == 0, answered.stderr
    # gRPC over TLS always verifies: without the CA the certificate is refused
    refused = secured.tsctl("models", "list", "--grpc")
    assert refused.returncode == 1
    assert "cannot verify the TLS certificate of the gRPC server" in refused.stderr


def test_cli_infer_with_cacert(secured: Server, pki: Pki, tmp_path: Path) -> None:
    data = tmp_path / "in.json"
    data.write_text('{"action": "echo"}')
    answered = secured.tsctl("infer", "swiss", data, "--cacert", pki.ca)
    assert answered.returncode == 0, answered.stderr
    assert answered.stderr == ""
    status = secured.tsctl("serve", "status", "--json", "--cacert", pki.ca)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["models"][0]["modelName"] == "swiss"


def test_cli_infer_with_insecure_warns_once(secured: Server, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"in{i}.json")
        files[-1].write_text('{"action": "echo"}')
    joined = ",".join(map(str, files))
    answered = secured.tsctl("infer", "swiss", joined, "--each", "--insecure")
    assert answered.returncode == 0, answered.stderr
    assert answered.stderr.splitlines() == [
        "tsctl: warning: --insecure: the server's TLS certificate is not verified"
    ]


def test_cli_refuses_a_certificate_it_cannot_verify(secured: Server, tmp_path: Path) -> None:
    data = tmp_path / "in.json"
    data.write_text('{"action": "echo"}')
    refused = secured.tsctl("infer", "swiss", data)
    assert refused.returncode == 1
    line = one_error_line(refused)
    assert "cannot verify the TLS certificate of https://127.0.0.1:" in line
    assert "--cacert" in line


def test_tls_client_on_a_plain_port_is_closed(plain: Server) -> None:
    """A TLS handshake on a plain port ends at once, on the inference port (an HTTP 400 the
    client cannot read as TLS) and on the tornado ports (closed) alike."""
    assert plain.info is not None
    context = ssl.create_default_context()
    for address in (
        plain.info.inference_address,
        plain.info.management_address,
        plain.info.metrics_address,
    ):
        with socket.create_connection(host_port(address), timeout=GUARD) as raw:
            raw.settimeout(GUARD)  # a hang ends as TimeoutError, which fails the test
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_plain_client_on_a_tls_port_is_closed_cleanly(secured: Server) -> None:
    assert secured.info is not None
    for address in (secured.info.inference_address, secured.info.management_address):
        host, port = host_port(address)
        conn = http.client.HTTPConnection(host, port, timeout=GUARD)
        try:
            conn.request("GET", "/ping")
            with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
                conn.getresponse()
        finally:
            conn.close()
    # and the server still serves TLS clients (the daemon log check: no error was logged)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    host, port = host_port(secured.info.inference_address)
    conn = http.client.HTTPSConnection(host, port, timeout=GUARD, context=context)
    conn.request("GET", "/ping")
    assert conn.getresponse().status == 200
    conn.close()


def test_pkcs12_keystore(tmp_path: Path, pki: Pki) -> None:
    props = tls_properties(
        keystore=pki.keystore, keystore_pass=KEYSTORE_PASS, keystore_type="PKCS12"
    )
    srv = Server(tmp_path, properties=props)
    srv.start(auth=False)
    try:
        assert srv.info is not None
        status, _ = https_get(srv.info.inference_address, "/ping", pki.ca)
        assert status == 200
        status, _ = https_get(srv.info.management_address, "/models", pki.ca)
        assert status == 200
    finally:
        srv.stop()


def _weak_key(folder: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return _private(folder / "weak.pem", _key_pem(key))


@pytest.mark.daemon_errors("start-up failed")
@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("world_readable", "may be read by any user (mode 644)"),
        ("mismatch", "does not match the certificate"),
        ("not_pem", "not a PEM file"),
        ("weak", "a 1024-bit RSA key is too weak"),
        ("missing", "cannot read private_key_file"),
        ("bad_keystore_pass", "cannot read it as PKCS12 with keystore_pass"),
        ("no_key", "no key is configured"),
    ],
)
def test_bad_key_material_refused_at_start(
    tmp_path: Path, pki: Pki, case: str, needle: str
) -> None:
    key: Path | None = pki.key
    props = tls_properties()
    if case == "world_readable":
        key = tmp_path / "readable.pem"
        key.write_bytes(pki.key.read_bytes())
        key.chmod(0o644)
    elif case == "mismatch":
        key = pki.other_key
    elif case == "not_pem":
        key = _private(tmp_path / "garbage.pem", b"not a key\n")
    elif case == "weak":
        key = _weak_key(tmp_path)
    elif case == "missing":
        key = tmp_path / "absent.pem"
    elif case == "bad_keystore_pass":
        key = None
        props.update(keystore=pki.keystore, keystore_pass="wrong")
    elif case == "no_key":
        key = None
    if key is not None:
        props.update(private_key_file=key, certificate_file=pki.cert)
    srv = Server(tmp_path / "srv", properties=props)
    started = srv.start(expect_ok=False)
    assert started.returncode != 0
    assert "Model server started" not in started.stdout
    line = one_error_line(started)
    assert needle in line
    if key is not None and case != "no_key":
        assert str(key) in line
