"""Tests for relay.server_tls: the TLS of implicit-TLS listeners, built by relay from the endpoint's options.

Each context is checked by a real TLS handshake in memory (pyOpenSSL
connections over memory BIOs, or Twisted's TLS protocol over a
StringTransport): the client must see the certificate the options name.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from certs import make_certificate
from relay.server_tls import listener_context, options_context
from relay.workers import InheritedEndpoint

MAX_ROUNDS = 20  # handshake round trips before a test gives up


def _client() -> SSL.Connection:
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    return client


def _step(connection: SSL.Connection) -> bool:
    """One handshake step; True once the handshake is done."""
    try:
        connection.do_handshake()
        return True
    except SSL.WantReadError:
        return False


def _outgoing(connection: SSL.Connection) -> bytes:
    try:
        return connection.bio_read(65536)
    except SSL.WantReadError:
        return b""


def served_chain(context: Any) -> list[x509.Certificate]:
    """The certificates a client is sent by a server using ``context`` (a real handshake in memory)."""
    server = SSL.Connection(context.getContext(), None)
    server.set_accept_state()
    client = _client()
    for _ in range(MAX_ROUNDS):
        client_done = _step(client)
        data = _outgoing(client)
        if data:
            server.bio_write(data)
        server_done = _step(server)
        data = _outgoing(server)
        if data:
            client.bio_write(data)
        if client_done and server_done:
            break
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain, "the handshake did not finish"
    return list(chain)


def pem_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ssl_options_serve_the_certificate_certkey_names(tmp_path: Path) -> None:
    """privateKey= and certKey= give a context whose handshake presents that certificate."""
    cert, key = make_certificate(tmp_path, "relay.test")
    chain = served_chain(options_context({"privateKey": str(key), "certKey": str(cert)}))
    assert chain[0] == pem_certificate(cert)


def test_without_certkey_the_key_file_holds_the_certificate_too(tmp_path: Path) -> None:
    """As with ssl:, certKey defaults to the privateKey file, which may hold certificate and key."""
    cert, key = make_certificate(tmp_path, "relay.test")
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    assert served_chain(options_context({"privateKey": str(both)}))[0] == pem_certificate(cert)


def test_extra_cert_chain_is_sent_after_the_certificate(tmp_path: Path) -> None:
    """extraCertChain= certificates follow the server's own in the handshake."""
    cert, key = make_certificate(tmp_path, "relay.test")
    ca, _ = make_certificate(tmp_path, "ca.test")
    chain = served_chain(options_context({"privateKey": str(key), "certKey": str(cert), "extraCertChain": str(ca)}))
    assert chain == [pem_certificate(cert), pem_certificate(ca)]


@pytest.mark.parametrize("problem", ["missing file", "mismatched key", "no certificate", "unknown option"])
def test_unusable_ssl_options_are_refused(tmp_path: Path, problem: str) -> None:
    """A file that is missing, a key of another certificate, a file without a certificate or an unknown option raise."""
    cert, key = make_certificate(tmp_path, "relay.test")
    _, other_key = make_certificate(tmp_path, "other.test")
    options, error, words = {
        "missing file": ({"privateKey": str(tmp_path / "no.pem")}, OSError, "No such file or directory"),
        "mismatched key": ({"privateKey": str(other_key), "certKey": str(cert)}, ValueError, "does not match"),
        "no certificate": ({"privateKey": str(key), "certKey": str(key)}, ValueError, "no readable PEM certificate"),
        "unknown option": ({"privateKey": str(key), "certKey": str(cert), "colour": "blue"}, ValueError,
                           "unknown TLS option colour="),
    }[problem]
    with pytest.raises(error) as caught:
        options_context(options)
    assert words in str(caught.value)


def test_listener_context_reads_ssl_and_systemd_ssl_descriptions(tmp_path: Path) -> None:
    """An ssl: description (its port and socket options aside) and a systemd-ssl: one give the same TLS."""
    cert, key = make_certificate(tmp_path, "relay.test")
    for description in (f"ssl:465:interface=127.0.0.1:backlog=5:privateKey={key}:certKey={cert}",
                        f"ssl:465:{key}:{cert}",
                        f"systemd-ssl:domain=INET:index=0:privateKey={key}:certKey={cert}"):
        assert served_chain(listener_context(description))[0] == pem_certificate(cert), description
    with pytest.raises(ValueError):
        listener_context("tcp:25")


class Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"220 hello\r\n")


def test_inherited_ssl_listener_serves_the_tls_of_its_description(tmp_path: Path) -> None:
    """A worker's ssl: listener on the master's socket wraps sessions in the TLS its description names."""
    cert, key = make_certificate(tmp_path, "relay.test")
    factory = protocol.Factory.forProtocol(Greeter)
    with socket.socket(socket.AF_INET) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(5)
        reactor = MemoryReactorClock()
        endpoint = InheritedEndpoint(reactor, s.fileno(),
                                     f"ssl:{s.getsockname()[1]}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        results: list[Any] = []
        endpoint.listen(factory).addBoth(results.append)
        [port] = results
        try:
            assert isinstance(port.factory, TLSMemoryBIOFactory) and port.factory.wrappedFactory is factory
            server = port.factory.buildProtocol(("127.0.0.1", 1))
            transport = StringTransport()
            server.makeConnection(transport)
            client = _client()
            greeting = b""
            for _ in range(MAX_ROUNDS):
                _step(client)
                data = _outgoing(client)
                if data:
                    server.dataReceived(data)
                reactor.advance(0)  # the TLS protocol sends what it gathered at the end of the turn
                reply = transport.value()
                transport.clear()
                if reply:
                    client.bio_write(reply)
                try:
                    greeting += client.recv(1024)
                except SSL.WantReadError:
                    pass
                if greeting:
                    break
            assert greeting == b"220 hello\r\n"
            assert client.get_peer_certificate(as_cryptography=True) == pem_certificate(cert)
        finally:
            port.connectionLost(None)
