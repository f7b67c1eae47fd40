"""A local certificate authority for the demo stack, so `sslmode=verify-full` works.

Uses `cryptography` only. Creates a CA (10 days, demo only) and server certificates for
127.0.0.1/localhost signed by it — the gateway's, the broker API's (HTTPS) and the demo
PostgreSQL's, so every hop uses verified TLS; private keys are written 0600.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guard.devstack.files import write_private


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)


def make_dev_ca(directory: Path) -> tuple[Path, Path, Path]:
    """Return (ca.pem, gateway.pem, gateway-key.pem); also writes broker.pem/-key.pem (the
    API's HTTPS certificate, see `broker_cert`) and postgres.pem/-key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "guard dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    gateway = _server_cert(directory, "gateway", ca, ca_key, now)
    _server_cert(directory, "broker", ca, ca_key, now)
    _server_cert(directory, "postgres", ca, ca_key, now)
    return ca_path, *gateway


def broker_cert(directory: Path) -> tuple[Path, Path]:
    """(broker.pem, broker-key.pem) that `make_dev_ca(directory)` wrote: the API's HTTPS
    certificate for 127.0.0.1/localhost, signed by the same CA as the gateway's."""
    return directory / "broker.pem", directory / "broker-key.pem"


def _server_cert(
    directory: Path,
    name: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> tuple[Path, Path]:
    """A 127.0.0.1/localhost server certificate `<name>.pem` + `<name>-key.pem`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"guard {name}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path
