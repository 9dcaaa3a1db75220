"""The server's TLS context, built from the configuration's certificate and key.

This module owns turning ``[server] tls_certificate`` and ``tls_key`` into
the TLS context the SMTP server offers with STARTTLS: the certificate file
read through ``relay.trust.load_certificates`` (the one PEM loader; the file
may hold the chain after the server's certificate), the key that must not be
encrypted, TLS 1.2 the minimum, and every problem a ConfigError naming the
file and key.  The composition root builds it once at start-up.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import ssl

from relay.config import ConfigError, ServerConfig
from relay.trust import load_certificates


def _read_bytes(path: str, source: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise ConfigError(f"{source}: {key}: cannot read {path!r}: {reason}") from None


def build_tls_context(server: ServerConfig, source: str) -> Optional[ssl.CertificateOptions]:
    """The server TLS context from server.tls_certificate and tls_key, or None.

    The certificate file may hold the chain after the server's certificate.
    TLS 1.2 is the minimum.  Any problem is a ConfigError naming the key.
    """
    if not server.tls_certificate:
        return None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_key, key_key = "server.tls_certificate", "server.tls_key"
    cert_pem = _read_bytes(server.tls_certificate, source, cert_key)
    try:
        chain = load_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"{source}: {cert_key}: {server.tls_certificate!r} holds no readable PEM certificate") from None
    key_pem = _read_bytes(server.tls_key, source, key_key)
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: {key_key}: {server.tls_key!r} holds no readable PEM private key (it must not be encrypted)"
        ) from None
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        options.getContext()
    except Exception:
        raise ConfigError(f"{source}: {key_key}: the key does not match server.tls_certificate") from None
    return options
