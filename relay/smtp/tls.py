"""Outbound TLS: relay's certificate check, and why a handshake failed.

``CertificateCheck`` is the connection creator for ``tls = "verify"``:
Twisted's client TLS options with relay's own verify callback, so the
leaf certificate must name the host in a subjectAltName (RFC 6125) and a
failure is recorded as a typed reason (``relay.outcome.Reason``) instead of
escaping from OpenSSL's callback as a logged traceback.  ``tls_failure``
turns what the check recorded, or the type of the error that ended the
handshake, into that reason and fixed words (never the library's text).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.outcome import Reason

# Why a TLS handshake failed, for logs and the queue (fixed texts, never the library's).
TEXT_TLS_NAME_MISMATCH = "TLS: certificate verification failed: the certificate does not match the name {name}"
TEXT_TLS_UNTRUSTED = "TLS: certificate verification failed: the certificate is not trusted"
TEXT_TLS_HANDSHAKE = "TLS: handshake failed"
TEXT_TLS_LOST = "TLS: connection lost during the handshake"

# X.509 verification errors (OpenSSL's X509_V_ERR_* numbers) worth naming in a log line.
_X509_ERRORS = {
    2: "the issuer certificate is unknown",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "a self-signed certificate is in the chain",
    20: "the issuer is not trusted",
    21: "the certificate chain is incomplete",
}


def tls_failure(recorded: Optional[tuple[Reason, int]], reason: Optional[Failure], name: str) -> tuple[Reason, str]:
    """Why a TLS handshake ended the connection: a typed reason and fixed words (never the library's).

    ``recorded`` is what the certificate check found (``CertificateCheck``):
    the reason and OpenSSL's X.509 error number.  Otherwise the exception
    type decides: an OpenSSL error is a failed handshake, anything else a
    connection lost during it.
    """
    error = reason.value if reason is not None else None
    try:
        from OpenSSL import SSL
        from service_identity import CertificateError, VerificationError
    except ImportError:  # pragma: no cover - dependencies of Twisted's TLS
        return Reason.TLS_LOST, TEXT_TLS_LOST
    if recorded is None and isinstance(error, (VerificationError, CertificateError)):
        recorded = (Reason.TLS_NAME, 0)
    if recorded is not None and recorded[0] == Reason.TLS_NAME:
        return Reason.TLS_NAME, TEXT_TLS_NAME_MISMATCH.format(name=name)
    if recorded is not None and recorded[0] == Reason.TLS_UNTRUSTED:
        detail = _X509_ERRORS.get(recorded[1], f"X.509 error {recorded[1]}")
        return Reason.TLS_UNTRUSTED, f"{TEXT_TLS_UNTRUSTED} ({detail})"
    if isinstance(error, SSL.Error):
        return Reason.TLS_HANDSHAKE, TEXT_TLS_HANDSHAKE
    return Reason.TLS_LOST, TEXT_TLS_LOST


@implementer(IOpenSSLClientConnectionCreator)
class CertificateCheck:
    """TLS for ``tls = "verify"``: Twisted's client options with relay's own certificate check.

    The chain is verified by OpenSSL against ``trust``; the leaf certificate
    must name ``name`` in a subjectAltName (service_identity, RFC 6125).  A
    failure is recorded as a typed reason (``failed``) and fails the
    handshake: no certificate without a subjectAltName slips through, and
    nothing is logged from inside OpenSSL's callback.
    """

    def __init__(self, name: str, trust: Any) -> None:
        from twisted.internet import ssl

        self._inner = ssl.optionsForClientTLS(name, trustRoot=trust)
        self._name = name
        self.failed: Optional[tuple[Reason, int]] = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self.verify)
        return connection

    def verify(self, connection: Any, certificate: Any, error: int, depth: int, ok: Any) -> bool:
        """OpenSSL's verify callback: True to go on; never raises."""
        if not ok:
            self.failed = self.failed or (Reason.TLS_UNTRUSTED, error)
            return False
        if depth != 0:
            return True
        try:
            from service_identity import CertificateError, VerificationError
            from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
            from service_identity.pyopenssl import extract_patterns

            try:
                service = IPAddress_ID(self._name) if _is_address(self._name) else DNS_ID(self._name)
                verify_service_identity(extract_patterns(certificate), [service], [])
            except (CertificateError, VerificationError):
                self.failed = (Reason.TLS_NAME, 0)
                return False
        except Exception:  # never let an exception escape into OpenSSL
            self.failed = (Reason.TLS_HANDSHAKE, 0)
            return False
        return True


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
