"""PEM certificates and the trust root of outbound TLS: one loader for every bundle.

``load_certificates`` reads the certificates of a PEM bundle with
cryptography's ``load_pem_x509_certificates`` (the server's certificate
chain, ``[delivery] tls_ca_file``).  ``TrustStore`` is the trust root that
SMTP delivery (``tls = "verify"``) and the MTA-STS policy fetch verify
against: the composition root builds it once, so the CA file is read once
at start-up, not on every verified connection; ``load_trust`` is that, from
``[delivery] tls_ca_file``, with a bad file a ConfigError naming the key.
"""

from __future__ import annotations

from typing import Any, Optional

from cryptography import x509

from relay.config import COMMAND_LINE, Config
from relay.config_values import ConfigError


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, in order; ValueError when it holds none that is readable."""
    return x509.load_pem_x509_certificates(pem)


def read_certificates(path: str) -> list[x509.Certificate]:
    """The certificates of the PEM file ``path``; OSError or ValueError (naming the file) otherwise."""
    with open(path, "rb") as f:
        pem = f.read()
    try:
        return load_certificates(pem)
    except ValueError:
        raise ValueError(f"no readable certificate in {path}") from None


class TrustStore:
    """The CA certificates of ``ca_file`` ("" : the platform's store), as Twisted's trust root.

    ``root()`` reads the file the first time and returns the same trust root
    after; ``load()`` does that now (the composition root calls it so a bad
    file stops start-up).
    """

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file
        self._root: Optional[Any] = None

    def load(self) -> "TrustStore":
        self.root()
        return self

    def root(self) -> Any:
        """Twisted's IOpenSSLTrustRoot for this store."""
        if self._root is None:
            from OpenSSL.crypto import X509
            from twisted.internet import ssl

            if not self.ca_file:
                self._root = ssl.platformTrust()
            else:
                certificates = read_certificates(self.ca_file)
                self._root = ssl.trustRootFromCertificates(
                    [ssl.Certificate(X509.from_cryptography(c)) for c in certificates])
        return self._root


def load_trust(config: Config) -> TrustStore:
    """``[delivery] tls_ca_file`` read once, for delivery and MTA-STS; a bad file is a ConfigError naming the key."""
    try:
        return TrustStore(config.delivery.tls_ca_file).load()
    except (OSError, ValueError):
        raise ConfigError(f"{config.source or COMMAND_LINE}: delivery.tls_ca_file: "
                          f"{config.delivery.tls_ca_file!r} holds no readable PEM certificate") from None
