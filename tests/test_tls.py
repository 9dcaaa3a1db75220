"""Tests for relay.smtp.tls: relay's certificate check for tls = "verify", with real certificates, and typed handshake failures."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from OpenSSL import SSL, crypto
from service_identity.exceptions import CertificateError, VerificationError
from twisted.internet.error import ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from certs import make_certificate
from relay.outcome import Reason
from relay.smtp.tls import CertificateCheck, tls_failure


class CertificateCheckTests(SynchronousTestCase):
    """tls="verify": relay's own check of the peer's certificate, with real certificates."""

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)

        def load(name: str, **kw) -> tuple[object, Path]:
            cert, _ = make_certificate(directory, name, **kw)
            return crypto.load_certificate(crypto.FILETYPE_PEM, cert.read_bytes()), cert

        self.good, self.good_path = load("mx.test", ips=("127.0.0.9",))
        self.no_san, _ = load("plain.test", subject_alt_name=False)

    def check(self, name: str) -> CertificateCheck:
        from twisted.internet import ssl

        return CertificateCheck(name, ssl.Certificate.loadPEM(self.good_path.read_bytes()))

    def test_a_matching_certificate_passes(self):
        """A trusted leaf naming the host (or its address) in a subjectAltName passes; issuers are OpenSSL's to judge."""
        for name in ("mx.test", "127.0.0.9"):
            check = self.check(name)
            self.assertTrue(check.verify(None, self.good, 0, 0, 1))
            self.assertIsNone(check.failed)
        self.assertTrue(self.check("mx.test").verify(None, self.good, 0, 1, 1))

    def test_a_certificate_without_subject_alt_name_fails_as_a_name_mismatch(self):
        """A leaf with the name only in its CN fails (reason tls-name), without a logged traceback."""
        check = self.check("plain.test")
        self.assertFalse(check.verify(None, self.no_san, 0, 0, 1))
        self.assertEqual(check.failed, (Reason.TLS_NAME, 0))
        self.assertEqual([e for e in self.events if e.get("log_failure") is not None], [])

    def test_a_certificate_for_another_name_fails(self):
        """A leaf for another host fails with reason tls-name."""
        check = self.check("other.test")
        self.assertFalse(check.verify(None, self.good, 0, 0, 1))
        self.assertEqual(check.failed, (Reason.TLS_NAME, 0))

    def test_an_untrusted_chain_fails_with_openssls_error_number(self):
        """When OpenSSL found the chain untrusted, the check fails at once and keeps the X.509 error number."""
        check = self.check("mx.test")
        self.assertFalse(check.verify(None, self.good, 18, 0, 0))
        self.assertEqual(check.failed, (Reason.TLS_UNTRUSTED, 18))


def test_tls_failure_names_the_certificate_problem_by_type():
    """A failed handshake gets a typed reason and fixed words: name mismatch, untrusted, handshake, lost."""
    library = SSL.Error([("SSL routines", "", "certificate verify failed")])  # what OpenSSL raises for both
    reason, text = tls_failure((Reason.TLS_NAME, 0), Failure(library), "smart.test")
    assert reason == Reason.TLS_NAME and "does not match the name smart.test" in text
    reason, text = tls_failure((Reason.TLS_UNTRUSTED, 18), Failure(library), "smart.test")
    assert reason == Reason.TLS_UNTRUSTED and "not trusted" in text and "self-signed" in text
    assert tls_failure(None, Failure(VerificationError(errors=[])), "smart.test")[0] == Reason.TLS_NAME
    assert tls_failure(None, Failure(CertificateError("no subjectAltName")), "smart.test")[0] == Reason.TLS_NAME
    other = SSL.Error([("SSL routines", "", "secret library detail")])
    assert tls_failure(None, Failure(other), "smart.test") == (Reason.TLS_HANDSHAKE, "TLS: handshake failed")
    assert tls_failure(None, Failure(ConnectionLost()), "smart.test")[0] == Reason.TLS_LOST
