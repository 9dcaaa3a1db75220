"""Self-signed certificates made at test time with the cryptography package."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(
    directory: Path, name: str, ips: tuple[str, ...] = (), subject_alt_name: bool = True
) -> tuple[Path, Path]:
    """Write ``name.pem`` (certificate) and ``name.key`` for ``name`` and ``ips``; return their paths.

    Without ``subject_alt_name`` the name is only the subject's common name (as old certificates had).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if subject_alt_name:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = Path(directory) / f"{name}.pem", Path(directory) / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def tls_server_options(directory: str, name: str = "relay.test", ips: tuple[str, ...] = ("127.0.0.1",)):
    """Twisted CertificateOptions serving a certificate made for ``name`` in ``directory``."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.internet import ssl as twisted_ssl

    cert, key = make_certificate(Path(directory), name, ips)
    return twisted_ssl.CertificateOptions(
        privateKey=load_pem_private_key(key.read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(cert.read_bytes()))
