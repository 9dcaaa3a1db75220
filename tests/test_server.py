"""Tests for relay.smtp.server: the inbound ESMTP session over StringTransport with a fake clock."""

from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any, Callable, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase as TrialTestCase
from zope.interface import implementer

from relay.auth import SenderLoginMap, SubmitterRealm
from relay.config import ServerConfig
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.policy import RelayPolicy
from relay.queue.store import Spool
from relay.smtp import replies as R
from relay.smtp import factory as factory_module
from relay.smtp import sasl as sasl_module
from relay.smtp import server as server_module
from relay.smtp.replies import Reply
from relay.smtp.factory import SMTPServerFactory
from relay.smtp.server import SessionState, SMTPServerProtocol

HOST = "relay.test"
NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"


# -- fakes -------------------------------------------------------------------------


class FakeMessage:
    """An IncomingMessage held in memory."""

    def __init__(self, spool: "FakeSpool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.data = bytearray()
        self.state = "open"
        self.envelope: Optional[Envelope] = None
        self.largest_write = 0

    def write(self, data: bytes) -> None:
        assert self.state == "open"
        self.data += data
        self.largest_write = max(self.largest_write, len(data))

    def commit(self, envelope: Envelope) -> Deferred:
        assert self.state == "open"
        self.state = "committing"
        self.envelope = envelope
        d = self.spool.commit_result()
        d.addCallback(lambda _: self._done("committed"))
        d.addErrback(lambda f: (self._done("failed"), f)[1])
        return d

    def _done(self, state: str) -> str:
        self.state = state
        return self.queue_id

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


class FakeSpool:
    """The spool API in memory; commits succeed at once unless told otherwise."""

    def __init__(self) -> None:
        self.messages: list[FakeMessage] = []
        self.commit_result: Callable[[], Deferred] = lambda: succeed(None)

    def new_message(self) -> FakeMessage:
        message = FakeMessage(self, f"Q{len(self.messages) + 1:04d}")
        self.messages.append(message)
        return message

    @property
    def committed(self) -> list[FakeMessage]:
        return [m for m in self.messages if m.state == "committed"]


class RecordingTransport(StringTransport):
    """StringTransport counting writes and recording startTLS."""

    def __init__(self, peer: Any) -> None:
        super().__init__(peerAddress=peer)
        self.writes = 0
        self.tls_started: list[Any] = []

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def startTLS(self, context: Any) -> None:
        self.tls_started.append(context)
        self.TLS = True


class Session:
    """One server session driven by a test."""

    def __init__(self, factory: SMTPServerFactory, peer: Any = None) -> None:
        self.factory = factory
        self.transport = RecordingTransport(peer or IPv4Address("TCP", "192.0.2.7", 40000))
        self.proto: SMTPServerProtocol = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        """Feed bytes and return everything the server wrote in answer."""
        self.proto.dataReceived(data)
        return self.read()

    def lines(self, data: bytes) -> list[str]:
        return self.send(data).decode("utf-8").split("\r\n")[:-1]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def make_factory(policy: Any = None, tls_context: Any = None, submission: bool = False,
                 spool: Optional[FakeSpool] = None, clock: Optional[Clock] = None,
                 portal: Any = None, etrn: Any = None, **config: Any) -> SMTPServerFactory:
    config.setdefault("relay_domains", ("example.org",))
    server = ServerConfig(**config)
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return SMTPServerFactory(HOST, server, spool if spool is not None else FakeSpool(),
                             policy or RelayPolicy(server), clock, tls_context=tls_context,
                             submission=submission, portal=portal, etrn=etrn)


def session(**kwargs: Any) -> Session:
    """A fresh session, greeting consumed."""
    peer = kwargs.pop("peer", None)
    s = Session(make_factory(**kwargs), peer)
    s.read()
    return s


def ready(**kwargs: Any) -> Session:
    """A session after EHLO."""
    s = session(**kwargs)
    s.send(b"EHLO client.test\r\n")
    return s


def code(data: bytes) -> str:
    return data.decode("utf-8")[:9]


TRANSACTION = b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"


def deliver(s: Session, body: bytes) -> bytes:
    """Send a transaction with ``body`` (which must end with the end of data); return the reply to it."""
    out = s.send(TRANSACTION)
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"), out
    return s.send(body)


def spool_of(s: Session) -> FakeSpool:
    return s.factory.spool


# -- greeting, HELO, EHLO ------------------------------------------------------------


def test_greeting_names_host() -> None:
    """The greeting is "220 <hostname> ESMTP relay" without an enhanced code."""
    s = Session(make_factory())
    assert s.read() == b"220 relay.test ESMTP relay\r\n"


def test_ehlo_advertises_extensions() -> None:
    """EHLO lists PIPELINING, SIZE, CHUNKING, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, DSN, ETRN and no STARTTLS or AUTH without TLS."""
    s = session(max_message_size=1234)
    out = s.lines(b"EHLO client.test\r\n")
    assert out[0] == "250-relay.test"
    assert out[-1].startswith("250 ")
    keywords = {line[4:] for line in out[1:]}
    assert keywords == {"PIPELINING", "SIZE 1234", "CHUNKING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "ETRN"}


def test_help_lists_the_verbs_the_session_offers() -> None:
    """HELP names STARTTLS only while it is offered, AUTH only where it is offered, and BDAT and ETRN always."""
    plain = session()
    assert plain.send(b"HELP\r\n") == b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP ETRN\r\n"
    tls = session(tls_context=object())
    assert b" STARTTLS ETRN\r\n" in tls.send(b"HELP\r\n")
    tls.send(b"STARTTLS\r\n")
    assert b"STARTTLS" not in tls.send(b"HELP\r\n")
    clear_auth = session(portal=object(), auth_in_clear=True)
    assert clear_auth.send(b"HELP\r\n").endswith(b" HELP AUTH ETRN\r\n")


def help_verbs(s: Session) -> list[str]:
    """The verbs HELP names beyond the basic ones, after an EHLO."""
    s.send(b"EHLO client.test\r\n")
    words = s.send(b"HELP\r\n").decode("ascii").split()
    return words[words.index("HELP", 3) + 1:]


def ehlo_verbs(s: Session) -> list[str]:
    """The EHLO keywords that name a verb of their own (STARTTLS, AUTH, ETRN), in EHLO's order."""
    lines = s.send(b"EHLO client.test\r\n").decode("ascii").split("\r\n")[1:-1]
    return [line[4:].split(" ")[0] for line in lines if line[4:].split(" ")[0] in ("STARTTLS", "AUTH", "ETRN")]


@pytest.mark.parametrize("kwargs, tls_first", [
    ({}, False),
    ({"tls_context": object()}, False),
    ({"tls_context": object()}, True),
    ({"portal": object()}, False),
    ({"portal": object(), "tls_context": object()}, True),
    ({"portal": object(), "auth_in_clear": True}, False),
])
def test_help_names_exactly_the_verbs_ehlo_offers(kwargs: dict, tls_first: bool) -> None:
    """In every kind of session (TLS offered or started, AUTH offered or not), HELP names the verbs EHLO offers."""
    s = session(**kwargs)
    if tls_first:
        assert s.send(b"STARTTLS\r\n").startswith(b"220 ")
    assert help_verbs(s) == ehlo_verbs(s)
    assert "BDAT" in s.send(b"HELP\r\n").decode("ascii").split() and b"250-CHUNKING\r\n" in s.send(b"EHLO c.test\r\n")


def test_ehlo_advertises_starttls_with_context() -> None:
    """STARTTLS is advertised when a TLS context is given."""
    s = session(tls_context=object())
    assert b"250-STARTTLS\r\n" in s.send(b"EHLO c.test\r\n")


def test_helo_reply() -> None:
    """HELO is answered with the host name."""
    assert session().send(b"HELO client.test\r\n") == b"250 relay.test\r\n"


@pytest.mark.parametrize("line", [b"HELO\r\n", b"EHLO\r\n", b"EHLO  \r\n", b"EHLO a b\r\n"])
def test_helo_syntax(line: bytes) -> None:
    """HELO/EHLO without a single host argument get 501 5.5.4."""
    assert code(session().send(line)) == "501 5.5.4"


def test_verbs_case_insensitive() -> None:
    """Verbs are recognised in any case."""
    s = session()
    assert s.send(b"ehlo c.test\r\n").startswith(b"250-relay.test")
    assert s.send(b"mail from:<s@x.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert s.send(b"rCpT To:<u@example.org>\r\n") == b"250 2.1.5 Ok\r\n"


# -- command sequence ------------------------------------------------------------------


def test_mail_before_helo() -> None:
    """MAIL before HELO/EHLO gets 503 5.5.1."""
    assert code(session().send(b"MAIL FROM:<s@x.test>\r\n")) == "503 5.5.1"


def test_rcpt_before_mail() -> None:
    """RCPT without MAIL gets 503 5.5.1."""
    assert code(ready().send(b"RCPT TO:<u@example.org>\r\n")) == "503 5.5.1"


def test_data_before_mail_and_without_recipients() -> None:
    """DATA without MAIL, or without an accepted recipient, gets 503 5.5.1."""
    s = ready()
    assert code(s.send(b"DATA\r\n")) == "503 5.5.1"
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(b"DATA\r\n")) == "503 5.5.1"


def test_nested_mail() -> None:
    """A second MAIL in a transaction gets 503 5.5.1."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(b"MAIL FROM:<t@x.test>\r\n")) == "503 5.5.1"


def test_session_state_follows_the_dialogue() -> None:
    """The session's state goes CONNECT, HELO, MAIL, DATA and back to HELO after the end of data and after RSET."""
    s = session()
    seen = [s.proto.state]
    s.send(b"EHLO client.test\r\n")
    seen.append(s.proto.state)
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    seen.append(s.proto.state)
    s.send(b"RCPT TO:<u@example.org>\r\nDATA\r\n")
    seen.append(s.proto.state)
    s.send(b"hi\r\n.\r\n")
    seen.append(s.proto.state)
    s.send(b"MAIL FROM:<s@x.test>\r\nRSET\r\n")
    seen.append(s.proto.state)
    assert seen == [SessionState.CONNECT, SessionState.HELO, SessionState.MAIL, SessionState.DATA,
                    SessionState.HELO, SessionState.HELO]


def test_rset_clears_transaction() -> None:
    """RSET ends the transaction: a new MAIL is accepted, RCPT alone is not."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert s.send(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert code(s.send(b"RCPT TO:<u@example.org>\r\n")) == "503 5.5.1"
    assert s.send(b"MAIL FROM:<t@x.test>\r\n") == b"250 2.1.0 Ok\r\n"


def test_second_ehlo_resets_transaction() -> None:
    """A second EHLO clears the transaction in progress."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@example.org>\r\n")
    s.send(b"EHLO again.test\r\n")
    assert code(s.send(b"DATA\r\n")) == "503 5.5.1"
    assert s.send(b"MAIL FROM:<t@x.test>\r\n") == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize("line, expected", [
    (b"NOOP\r\n", b"250 2.0.0 Ok\r\n"),
    (b"VRFY someone\r\n", b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
    (b"HELP\r\n", R.HELP_REPLY.to_bytes()),
    (b"EXPN list\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
    (b"FOO\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
    (b"\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
    (b"do_HELO x\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
    (b"STARTTLS\r\n", b"502 5.5.1 Error: command not implemented\r\n"),
    (b"NOOP\nQUIT\r\n", b"500 5.5.2 Error: bare <CR> or <LF> in command\r\n"),
    (b"NOOP \xff\r\n", b"500 5.5.2 Error: command is not valid UTF-8\r\n"),
])
def test_simple_commands(line: bytes, expected: bytes) -> None:
    """NOOP, VRFY, HELP, unknown verbs, bare LF and bad UTF-8 in commands get their fixed replies."""
    s = ready()
    assert s.send(line) == expected
    assert not s.closed


def test_quit_closes() -> None:
    """QUIT answers 221 2.0.0 and closes; nothing behind it is executed."""
    s = ready()
    assert s.send(b"QUIT\r\nNOOP\r\n") == b"221 2.0.0 Bye\r\n"
    assert s.closed


# -- MAIL and RCPT --------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    (b"MAIL FROM:<s@x.test>\r\n", "250 2.1.0"),
    (b"MAIL FROM: <s@x.test>\r\n", "250 2.1.0"),
    (b"MAIL FROM:<>\r\n", "250 2.1.0"),
    (b"MAIL FROM:<@a.test:s@x.test>\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s@x.test> SIZE=1000\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s@x.test> BODY=8BITMIME\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s@x.test> body=7bit\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s\xc3\xa9@x.test> SMTPUTF8\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s\xc3\xa9@x.test>\r\n", "501 5.1.7"),
    (b"MAIL FROM:s@x.test\r\n", "501 5.1.7"),
    (b"MAIL FROM:  <s@x.test>\r\n", "501 5.1.7"),
    (b"MAIL FROM:<s@@x.test>\r\n", "501 5.1.7"),
    (b"MAIL FROM:<s@x.test> SIZE=1001\r\n", "552 5.3.4"),
    (b"MAIL FROM:<s@x.test> SIZE=abc\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> BODY=BINARYMIME\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> SMTPUTF8=yes\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> RET=HDRS\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s@x.test> RET=HDRS ENVID=QQ314159\r\n", "250 2.1.0"),
    (b"MAIL FROM:<s@x.test> RET=BODY\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> RET=FULL RET=HDRS\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> ENVID=a=b\r\n", "501 5.5.4"),
    (b"MAIL FROM:<s@x.test> SIZE=\r\n", "501 5.5.4"),
    (b"MAIL TO:<s@x.test>\r\n", "501 5.5.4"),
    (b"MAIL\r\n", "501 5.5.4"),
])
def test_mail_command(line: bytes, expected: str) -> None:
    """MAIL accepts valid paths and parameters and refuses the rest with the right code."""
    assert code(ready(max_message_size=1000).send(line)) == expected


def test_mail_params_need_ehlo() -> None:
    """After HELO (not EHLO) MAIL parameters, SMTPUTF8 included, get 555 5.5.4."""
    s = session()
    s.send(b"HELO c.test\r\n")
    assert code(s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")) == "555 5.5.4"
    assert code(s.send(b"MAIL FROM:<s@x.test>\r\n")) == "250 2.1.0"


@pytest.mark.parametrize("line, expected", [
    (b"RCPT TO:<u@example.org>\r\n", "250 2.1.5"),
    (b"RCPT TO: <u@example.org>\r\n", "250 2.1.5"),
    (b"RCPT TO:<\"john doe\"@example.org>\r\n", "250 2.1.5"),
    (b"RCPT TO:<@hop.test:u@example.org>\r\n", "250 2.1.5"),
    (b"RCPT TO:<>\r\n", "501 5.1.3"),
    (b"RCPT TO:<u>\r\n", "501 5.1.3"),
    (b"RCPT TO:u@example.org\r\n", "501 5.1.3"),
    (b"RCPT TO:<u@example..org>\r\n", "501 5.1.3"),
    (b"RCPT TO:<u@example.org> NOTIFY=NEVER\r\n", "250 2.1.5"),
    (b"RCPT TO:<u@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u@example.org\r\n", "250 2.1.5"),
    (b"RCPT TO:<u@example.org> NOTIFY=NEVER,SUCCESS\r\n", "501 5.5.4"),
    (b"RCPT TO:<u@example.org> NOTIFY=FAILURE NOTIFY=DELAY\r\n", "501 5.5.4"),
    (b"RCPT TO:<u@example.org> ORCPT=u@example.org\r\n", "501 5.5.4"),
    (b"RCPT TO:<u@example.org> XFOO=1\r\n", "555 5.5.4"),
    (b"RCPT FROM:<u@example.org>\r\n", "501 5.5.4"),
    (b"RCPT TO:<u@elsewhere.test>\r\n", "554 5.7.1"),
    (b"RCPT TO:<u@[192.0.2.1]>\r\n", "554 5.7.1"),
    (b"RCPT TO:<u@[192.0.2.300]>\r\n", "501 5.1.3"),
    (b"RCPT TO:<u@b\xc3\xbccher.example>\r\n", "501 5.1.3"),
])
def test_rcpt_command(line: bytes, expected: str) -> None:
    """RCPT accepts valid recipients, refuses bad syntax, the null path, parameters and relaying."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(line)) == expected


def test_utf8_recipient_with_smtputf8() -> None:
    """A U-label recipient is accepted in an SMTPUTF8 transaction."""
    s = ready(relay_domains=("bücher.example",))
    s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")
    assert code(s.send("RCPT TO:<jörg@bücher.example>\r\n".encode())) == "250 2.1.5"


def test_trusted_peer_relays_anywhere() -> None:
    """A client from a trusted network may relay to any domain; IPv6 loopback included."""
    for peer in (IPv4Address("TCP", "127.0.0.1", 1), IPv6Address("TCP", "::1", 1)):
        s = ready(peer=peer)
        s.send(b"MAIL FROM:<s@x.test>\r\n")
        assert code(s.send(b"RCPT TO:<u@elsewhere.test>\r\n")) == "250 2.1.5"


def test_max_recipients() -> None:
    """Recipients beyond max_recipients get 452 4.5.3; those accepted are kept."""
    s = ready(max_recipients=2)
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    out = s.send(b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n")
    assert out.split(b"\r\n")[:3] == [b"250 2.1.5 Ok", b"250 2.1.5 Ok", b"452 4.5.3 Error: too many recipients"]
    s.send(b"DATA\r\n")
    s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    envelope = spool_of(s).committed[0].envelope
    assert [r.address for r in envelope.recipients] == ["a@example.org", "b@example.org"]


def test_duplicate_recipient_kept_once() -> None:
    """The same recipient given twice is accepted and stored once."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
    s.send(b"x\r\n.\r\n")
    assert len(spool_of(s).committed[0].envelope.recipients) == 1


def test_submission_requires_authentication() -> None:
    """On a submission listener MAIL before authentication gets 530 5.7.0; after it, MAIL works."""
    s = ready(submission=True)
    assert s.send(b"MAIL FROM:<s@x.test>\r\n") == b"530 5.7.0 Authentication required\r\n"
    s.proto.auth_user = "alice"
    assert s.send(b"MAIL FROM:<s@x.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert code(s.send(b"RCPT TO:<u@elsewhere.test>\r\n")) == "250 2.1.5"
    s.send(b"DATA\r\nx\r\n.\r\n")
    client = spool_of(s).committed[0].envelope.client
    assert (client.auth_user, client.protocol) == ("alice", "ESMTPA")


# -- a whole transaction --------------------------------------------------------------------


def test_message_stored_with_envelope() -> None:
    """A message is written after one Received header, committed with its envelope, then 250 with its id."""
    s = ready(peer=IPv4Address("TCP", "192.0.2.7", 40001))
    s.send(b"MAIL FROM:<s@x.test> BODY=8BITMIME SIZE=50\r\nRCPT TO:<@hop.test:u@example.org>\r\n")
    assert s.send(b"DATA\r\n") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
    message = spool_of(s).messages[0]
    header = (b"Received: from client.test ([192.0.2.7])\r\n"
              b"\tby relay.test (relay) with ESMTP id Q0001\r\n"
              b"\tfor <u@example.org>; " + DATE.encode() + b"\r\n")
    assert bytes(message.data) == header + b"Subject: hi\r\n\r\nbody\r\n"
    assert message.envelope == Envelope(
        queue_id="Q0001", sender="s@x.test",
        recipients=(Recipient(address="u@example.org", source_route=("hop.test",)),),
        client=ClientInfo(address="192.0.2.7", port=40001, helo="client.test", protocol="ESMTP",
                          trusted=False),
        arrival=NOW, size=len(message.data), body_type="8BITMIME", smtputf8=False,
    )


def test_received_header_without_for_when_many_recipients() -> None:
    """With several recipients the Received header has no "for" clause."""
    s = ready(peer=IPv6Address("TCP", "::1", 2))
    s.send(b"MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
    s.send(b"x\r\n.\r\n")
    message = spool_of(s).messages[0]
    assert bytes(message.data).startswith(
        b"Received: from client.test ([IPv6:::1])\r\n"
        b"\tby relay.test (relay) with UTF8SMTP id Q0001;\r\n"
        b"\t" + DATE.encode() + b"\r\nx\r\n")
    assert message.envelope.sender == "" and message.envelope.smtputf8
    assert message.envelope.client.trusted


def test_helo_session_protocol_smtp() -> None:
    """A HELO session is recorded as protocol SMTP."""
    s = session()
    s.send(b"HELO old.test\r\n" + TRANSACTION + b"x\r\n.\r\n")
    message = spool_of(s).committed[0]
    assert b"with SMTP id" in bytes(message.data)
    assert message.envelope.client.protocol == "SMTP"


def test_two_messages_in_one_session() -> None:
    """After a message the session accepts another transaction."""
    s = ready()
    assert deliver(s, b"one\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
    assert deliver(s, b"two\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0002\r\n"
    assert [m.data.endswith(t) for m, t in zip(spool_of(s).messages, (b"one\r\n", b"two\r\n"))] == [True, True]


def test_empty_message() -> None:
    """A DATA stream that is only the end line stores just the Received header."""
    s = ready()
    assert code(deliver(s, b".\r\n")) == "250 2.0.0"
    assert bytes(spool_of(s).messages[0].data).count(b"\r\n") == 3


def test_dot_unstuffing() -> None:
    """A line starting with a dot loses that dot: ".." becomes "."; "..." becomes ".."."""
    s = ready()
    deliver(s, b"..\r\n...x\r\na.b\r\n.y\r\n.\r\n")
    assert spool_of(s).messages[0].data.endswith(b"\r\n.\r\n..x\r\na.b\r\ny\r\n")


def test_8bit_stored_as_is() -> None:
    """8-bit octets in the content are stored unchanged."""
    s = ready()
    content = b"Subject: \xe9\xff\r\n\r\nab\xc3\xa9\x80\r\n"
    assert code(deliver(s, content + b".\r\n")) == "250 2.0.0"
    assert spool_of(s).messages[0].data.endswith(content)


@pytest.mark.parametrize("content", [
    b"Subject: x\r\n\r\na\x00b\r\n",
    b"Subject: x\r\n\r\n\x00.\r\nMAIL FROM:<admin@partner.test>\r\n",  # smuggling past a NUL-dropping hop
    b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\x00" + b"y" * 10 + b"\r\n",  # inside an overlong line
])
def test_nul_in_content_is_refused_and_nothing_stored(content: bytes) -> None:
    """A NUL anywhere in the content gets 554 5.6.0 at the end of data, and nothing is queued."""
    s = ready()
    reply = deliver(s, content + b".\r\n")
    assert code(reply) == "554 5.6.0" and b"NUL" in reply
    assert [m.state for m in spool_of(s).messages] == ["aborted"]


def test_commands_pipelined_behind_data_are_processed() -> None:
    """Commands that arrive in the same read as the end of data are executed after the 250."""
    s = ready()
    s.send(TRANSACTION)
    out = s.send(b"x\r\n.\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n")
    assert out == b"250 2.0.0 Ok: queued as Q0001\r\n250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n"
    assert s.closed


def test_data_argument_refused() -> None:
    """DATA with an argument gets 501 5.5.4."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@example.org>\r\n")
    assert code(s.send(b"DATA now\r\n")) == "501 5.5.4"


# -- DATA content checks -----------------------------------------------------------------------


SMUGGLING = [
    b"a\r\n\n.\n\r\nMAIL FROM:<evil@x.test>\r\n",
    b"a\r\n\r.\r\r\nb\r\n",
    b"a\r\n.\nRCPT TO:<x@y.test>\r\n",
    b"a\n.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"a\r.\r\nb\r\n",
    b"a\n\r\n",
    b"a\r\r\n",
    b"\n.\r\n",
    b"Subject: x\r\n\r\nfirst\r\n\n.\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nsmuggled\r\n",
]


@pytest.mark.parametrize("payload", SMUGGLING)
def test_smuggling_refused(payload: bytes) -> None:
    """Bare CR or LF anywhere in the data is refused with 554 5.6.0 at the real CRLF.CRLF end; nothing is stored."""
    s = ready()
    s.send(TRANSACTION)
    assert s.send(payload) == b""  # the fake end is not an end
    out = s.send(b"tail\r\n.\r\nNOOP\r\n")
    assert out == R.BARE_NEWLINE_DATA.to_bytes() + b"250 2.0.0 Ok\r\n"
    assert [m.state for m in spool_of(s).messages] == ["aborted"]


def test_smuggling_split_across_reads() -> None:
    """A bare LF before a dot line is caught even when the payload is split across reads."""
    s = ready()
    s.send(TRANSACTION)
    for piece in (b"a\r", b"\n", b"\n", b".", b"\r", b"\n"):
        assert s.send(piece) == b""
    assert s.send(b"\r\n.\r\n") == R.BARE_NEWLINE_DATA.to_bytes()


def test_text_line_limit() -> None:
    """A text line of 1000 octets with its CRLF passes; 1001 is refused with 554 5.6.0."""
    s = ready()
    assert code(deliver(s, b"a" * 998 + b"\r\n.\r\n")) == "250 2.0.0"
    assert deliver(s, b"a" * 999 + b"\r\n.\r\n") == R.LINE_TOO_LONG_DATA.to_bytes()
    assert [m.state for m in spool_of(s).messages] == ["committed", "aborted"]


def test_text_line_limit_after_unstuffing() -> None:
    """The limit applies to the line after dot-unstuffing: a stuffed 998-octet dot line passes."""
    s = ready()
    assert code(deliver(s, b".." + b"a" * 997 + b"\r\n.\r\n")) == "250 2.0.0"


def test_very_long_line_in_pieces_memory_bounded() -> None:
    """A line of a megabyte fed in pieces is refused at the end; the reader keeps little in memory."""
    s = ready()
    s.send(TRANSACTION)
    for _ in range(256):
        assert s.send(b"x" * 4096) == b""
    assert len(s.proto._receiver.reader._pending) <= 4096 + 1000
    assert s.send(b"\r\n.\r\n") == R.LINE_TOO_LONG_DATA.to_bytes()


def test_message_size_limit() -> None:
    """A stream over max_message_size gets 552 5.3.4 at its end, nothing is queued and writing stopped early."""
    s = ready(max_message_size=10_000)
    s.send(TRANSACTION)
    for _ in range(101):
        assert s.send(b"y" * 98 + b"\r\n") == b""
    assert s.send(b".\r\nNOOP\r\n") == R.SIZE_EXCEEDED.to_bytes() + b"250 2.0.0 Ok\r\n"
    message = spool_of(s).messages[0]
    assert message.state == "aborted"
    assert len(message.data) < 10_000 + 300


def test_message_size_exactly_at_limit() -> None:
    """A message of exactly max_message_size octets is accepted."""
    s = ready(max_message_size=1000)
    assert code(deliver(s, (b"z" * 98 + b"\r\n") * 10 + b".\r\n")) == "250 2.0.0"


def received_lines(count: int) -> bytes:
    return b"".join(b"Received: from h%d.test by x.test; %s\r\n" % (i, DATE.encode()) for i in range(count))


def test_hundred_received_headers_pass() -> None:
    """A message with exactly 100 Received headers is accepted."""
    s = ready()
    assert code(deliver(s, received_lines(100) + b"Subject: x\r\n\r\nbody\r\n.\r\n")) == "250 2.0.0"


def test_hundred_and_one_received_headers_refused() -> None:
    """A message with 101 Received headers (any case) is refused as a mail loop with 554 5.4.6."""
    s = ready()
    content = received_lines(100) + b"rEcEiVeD: from last.test\r\n\r\nbody\r\n.\r\n"
    assert deliver(s, content) == R.TOO_MANY_HOPS.to_bytes()
    assert spool_of(s).messages[0].state == "aborted"


def test_received_in_body_not_counted() -> None:
    """Received lines after the header section do not count as hops."""
    s = ready()
    content = b"Subject: x\r\n\r\n" + received_lines(150) + b".\r\n"
    assert code(deliver(s, content)) == "250 2.0.0"


# -- spool outcomes ---------------------------------------------------------------------------------


def test_commit_failure_answers_451() -> None:
    """When the spool cannot store the message, the reply is 451 4.3.0 and nothing else."""
    s = ready()
    spool_of(s).commit_result = lambda: fail(OSError(28, "No space left on device"))
    out = deliver(s, b"x\r\n.\r\n")
    assert out == b"451 4.3.0 Error: queue file write error\r\n"
    assert b"space" not in out


def test_250_only_after_commit_fires() -> None:
    """The 250 is sent only when the commit Deferred fires; pipelined commands wait behind it."""
    s = ready()
    pending: Deferred = Deferred()
    spool_of(s).commit_result = lambda: pending
    s.send(TRANSACTION)
    assert s.send(b"x\r\n.\r\nNOOP\r\nQUIT\r\n") == b""
    assert s.transport.producerState == "paused"
    pending.callback(None)
    assert s.read() == b"250 2.0.0 Ok: queued as Q0001\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


def test_write_error_answers_451() -> None:
    """A write to the queue file that raises leads to 451 4.3.0 at the end of data, and an abort."""
    s = ready()
    s.send(TRANSACTION)

    def broken(data: bytes) -> None:
        raise OSError("disk on fire")

    spool_of(s).messages[0].write = broken  # type: ignore[method-assign]
    assert s.send(b"x\r\n.\r\n") == R.QUEUE_WRITE_ERROR.to_bytes()
    assert spool_of(s).messages[0].state == "aborted"


def test_disconnect_during_data_aborts() -> None:
    """A connection lost in the middle of DATA aborts the message."""
    s = ready()
    s.send(TRANSACTION + b"partial\r\n")
    s.proto.connectionLost(Failure(ConnectionError()))
    assert spool_of(s).messages[0].state == "aborted"


# -- pipelining -----------------------------------------------------------------------------------


def test_pipelined_replies_in_one_write() -> None:
    """A pipelined batch of commands is answered in order with a single write."""
    s = ready()
    s.transport.writes = 0
    out = s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@elsewhere.test>\r\n"
                 b"RCPT TO:<c@example.org>\r\nDATA\r\n")
    assert out.split(b"\r\n")[:-1] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"554 5.7.1 Relay access denied",
                                       b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"]
    assert s.transport.writes == 1


class SlowPolicy(RelayPolicy):
    """A policy whose answers come later, from Deferreds the test fires."""

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server)
        self.pending: list[tuple[str, Deferred]] = []

    def check_recipient(self, client: ClientInfo, sender: str, recipient: Recipient) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((recipient.address, d))
        return d


def test_pipelining_with_asynchronous_policy() -> None:
    """With a policy answering later, replies stay in command order and later lines wait for the answer."""
    server = ServerConfig(relay_domains=("example.org",))
    policy = SlowPolicy(server)
    s = ready(policy=policy)
    out = s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nNOOP\r\n")
    assert out == b"250 2.1.0 Ok\r\n"
    assert [a for a, _ in policy.pending] == ["a@example.org"]  # the second RCPT is not read yet
    assert s.transport.producerState == "paused"
    policy.pending[0][1].callback(Reply(550, "5.7.1", "no mail to this domain"))
    assert s.read() == b"550 5.7.1 no mail to this domain\r\n"
    assert [a for a, _ in policy.pending] == ["a@example.org", "b@example.org"]
    policy.pending[1][1].callback(None)
    assert s.read() == b"250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n"
    assert s.transport.producerState == "producing"
    s.send(b"DATA\r\nx\r\n.\r\n")
    assert [r.address for r in spool_of(s).committed[0].envelope.recipients] == ["b@example.org"]


def test_policy_exception_answers_451() -> None:
    """A policy that raises gets 451 4.3.0 for that recipient; the session goes on."""
    class Broken(RelayPolicy):
        def check_recipient(self, *args: Any) -> None:
            raise RuntimeError("secret internals")

    s = ready(policy=Broken(ServerConfig()))
    out = s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nNOOP\r\n")
    assert out == b"250 2.1.0 Ok\r\n451 4.3.0 Error: internal error, try again later\r\n250 2.0.0 Ok\r\n"


def test_asynchronous_policy_failure_answers_451() -> None:
    """A policy Deferred that errbacks gets 451 4.3.0 and input resumes."""
    policy = SlowPolicy(ServerConfig())
    s = ready(policy=policy)
    s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nNOOP\r\n")
    policy.pending[0][1].errback(RuntimeError("boom"))
    assert s.read() == b"451 4.3.0 Error: internal error, try again later\r\n250 2.0.0 Ok\r\n"


def test_spool_new_message_exception_answers_451() -> None:
    """A spool that raises at DATA gets 451 4.3.0; the session goes on."""
    s = ready()
    spool_of(s).new_message = lambda: (_ for _ in ()).throw(OSError("no"))  # type: ignore[method-assign]
    out = s.send(TRANSACTION + b"NOOP\r\n")
    assert out.endswith(b"451 4.3.0 Error: internal error, try again later\r\n250 2.0.0 Ok\r\n")


# -- limits ---------------------------------------------------------------------------------------------


def test_command_line_of_512_octets_accepted() -> None:
    """A command line of exactly 512 octets including CRLF is processed."""
    s = ready()
    line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    assert s.send(line) == b"250 2.0.0 Ok\r\n"


def test_command_line_over_512_octets_refused_rest_discarded() -> None:
    """A 513-octet line gets 500 5.5.6; what it carried is not executed and the next line is."""
    s = ready()
    line = b"MAIL FROM:<" + b"a" * 496 + b"QUIT\r\n"
    assert len(line) == 513
    out = s.send(line + b"NOOP\r\n")
    assert out == b"500 5.5.6 Error: line too long\r\n250 2.0.0 Ok\r\n"
    assert not s.closed


def test_overlong_line_across_reads_discarded() -> None:
    """An overlong line arriving in several reads is discarded up to its CRLF, even a CRLF split across reads."""
    s = ready()
    assert s.send(b"NOOP " + b"x" * 600) == b"500 5.5.6 Error: line too long\r\n"
    assert s.send(b"QUIT" * 100) == b""
    assert s.send(b"QUIT\r") == b""
    assert s.send(b"\nRSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert not s.closed


def test_too_many_errors_close_session() -> None:
    """The max_errors-th protocol error is followed by 421 4.7.0 and the connection closes."""
    s = ready(max_errors=3)
    out = s.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out.split(b"\r\n")[:-1] == [b"500 5.5.2 Error: command not recognized"] * 3 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    assert s.closed


def test_relay_refusals_are_not_protocol_errors() -> None:
    """Refused recipients do not count towards max_errors."""
    s = ready(max_errors=2)
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    out = s.send(b"RCPT TO:<a@elsewhere.test>\r\n" * 5)
    assert out.count(b"554 5.7.1") == 5 and not s.closed


def test_idle_timeout() -> None:
    """An idle session gets 421 4.4.2 after idle_timeout and is closed; activity restarts the timer."""
    s = ready(idle_timeout=60)
    clock = s.factory.clock
    clock.advance(59)
    s.send(b"NOOP\r\n")
    clock.advance(59)
    assert s.read() == b"" and not s.closed
    clock.advance(1)
    assert s.read() == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    assert s.closed


def test_idle_timeout_during_data_aborts() -> None:
    """A session idle in the middle of DATA times out and its message is aborted."""
    s = ready(idle_timeout=30)
    s.send(TRANSACTION + b"partial")
    s.factory.clock.advance(30)
    assert code(s.read()) == "421 4.4.2"
    assert spool_of(s).messages[0].state == "aborted"


def test_max_sessions() -> None:
    """Over max_sessions a connection gets 421 4.7.0 at greeting and is closed; a freed slot is reused."""
    factory = make_factory(max_sessions=1)
    first = Session(factory)
    second = Session(factory)
    assert second.read() == b"421 4.7.0 relay.test Too many connections, try again later\r\n"
    assert second.closed
    second.proto.connectionLost(Failure(ConnectionError()))
    assert factory.sessions == 1
    first.proto.connectionLost(Failure(ConnectionError()))
    assert factory.sessions == 0
    third = Session(factory)
    assert third.read() == b"220 relay.test ESMTP relay\r\n"


# -- STARTTLS -----------------------------------------------------------------------------------------------


def test_starttls_discards_pipelined_commands_and_resets() -> None:
    """STARTTLS answers 220 2.0.0, starts TLS, drops commands pipelined behind it and forgets EHLO."""
    context = object()
    s = ready(tls_context=context)
    out = s.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<u@example.org>\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert s.transport.tls_started == [context]
    assert code(s.send(b"MAIL FROM:<s@x.test>\r\n")) == "503 5.5.1"
    ehlo = s.send(b"EHLO c.test\r\n")
    assert b"STARTTLS" not in ehlo
    assert code(s.send(b"STARTTLS\r\n")) == "503 5.5.1"
    s.send(TRANSACTION + b"x\r\n.\r\n")
    message = spool_of(s).committed[0]
    assert message.envelope.sender == "s@x.test"
    assert message.envelope.client.protocol == "ESMTPS" and message.envelope.client.tls
    assert b"with ESMTPS id" in bytes(message.data)


def test_starttls_resets_transaction() -> None:
    """A transaction begun before STARTTLS does not survive it."""
    s = ready(tls_context=object())
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    s.send(b"STARTTLS\r\n")
    s.send(b"EHLO c.test\r\n")
    assert code(s.send(b"RCPT TO:<u@example.org>\r\n")) == "503 5.5.1"


def test_starttls_argument_refused() -> None:
    """STARTTLS with an argument gets 501 5.5.4 and TLS is not started."""
    s = ready(tls_context=object())
    assert code(s.send(b"STARTTLS now\r\n")) == "501 5.5.4"
    assert s.transport.tls_started == []


# -- chunk-split invariance ------------------------------------------------------------------------------------


PIECES = [b"a", b"Subject: x", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\x00", b"\xff",
          b".\r\n", b"\r\n.\r\n", b"Received: x\r\n", b"x" * 300, b"y" * 700, b"NOOP\r\n"]


def reference_verdict(stream: bytes, max_size: int) -> tuple[Optional[bytes], bytes]:
    """A line-by-line model of DATA: (reply or None for 250, stored content), or raises if no end."""
    lines, pos = [], 0
    while True:
        end = stream.find(b"\r\n", pos)
        line, pos = stream[pos:end], end + 2
        if line == b".":
            break
        lines.append(line)
    unstuffed = [l[1:] if l.startswith(b".") else l for l in lines]
    content = b"".join(l + b"\r\n" for l in unstuffed)
    hops = 0
    for l in unstuffed:
        if l == b"":
            break
        hops += l.lower().startswith(b"received:")
    if any(b"\r" in l or b"\n" in l for l in lines):
        return R.BARE_NEWLINE_DATA.to_bytes(), content
    if any(b"\0" in l for l in lines):
        return R.NUL_IN_DATA.to_bytes(), content
    if any(len(l) + 2 > 1000 for l in unstuffed):
        return R.LINE_TOO_LONG_DATA.to_bytes(), content
    if len(content) > max_size:
        return R.SIZE_EXCEEDED.to_bytes(), content
    if hops > 100:
        return R.TOO_MANY_HOPS.to_bytes(), content
    return None, content


def run_stream(chunks: list[bytes], max_size: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    s = ready(max_message_size=max_size, max_errors=1000)
    s.send(TRANSACTION)
    out = b"".join(s.send(chunk) for chunk in chunks)
    return out, [(m.state, bytes(m.data) if m.state == "committed" else b"") for m in spool_of(s).messages]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.lists(st.integers(0, 3000), max_size=12),
       st.sampled_from([200, 2000, 35_000_000]))
def test_data_chunk_split_invariance(pieces: list[bytes], cuts: list[int], max_size: int) -> None:
    """However the stream is split, the reply and the stored bytes are the same, and match a line-by-line model."""
    stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
    whole_out, whole_stored = run_stream([stream], max_size)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    split_out, split_stored = run_stream(chunks, max_size)
    assert split_out == whole_out
    assert split_stored == whole_stored
    expected_reply, content = reference_verdict(stream, max_size)
    if expected_reply is None:
        assert whole_out.startswith(b"250 2.0.0 Ok: queued as Q0001\r\n")
        assert whole_stored[0][0] == "committed"
        assert whole_stored[0][1].split(b"\r\n", 3)[3] == content
    else:
        assert whole_out.startswith(expected_reply)
        assert whole_stored[0][0] == "aborted"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_many_received_headers_split_invariance(count: int, sizes: list[int]) -> None:
    """The Received count and its verdict do not depend on where the reads split the header section."""
    stream = received_lines(count) + b"Subject: x\r\n\r\nbody\r\n.\r\n"
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        size = sizes[i % len(sizes)] * 7
        chunks.append(stream[pos:pos + size])
        pos, i = pos + size, i + 1
    out, stored = run_stream(chunks, 35_000_000)
    if count > 100:
        assert out == R.TOO_MANY_HOPS.to_bytes()
    else:
        assert code(out) == "250 2.0.0"


def test_big_message_fast_path() -> None:
    """A multi-megabyte message in 64 KiB reads is stored exactly, in writes no bigger than a read."""
    s = ready()
    s.send(TRANSACTION)
    content = (b"." + b"z" * 76 + b"\r\n") * 40_000
    stream = content + b".\r\n"
    for i in range(0, len(stream), 65536):
        s.send(stream[i:i + 65536])
    message = spool_of(s).committed[0]
    assert message.data.endswith(content.replace(b"\r\n.", b"\r\n")[1:])
    assert message.largest_write <= 65536 + 1000


# -- the real spool --------------------------------------------------------------------------------


def test_real_spool_commit(tmp_path: Any) -> None:
    """With the on-disk spool, 250 comes only once the commit ran, and the queued files hold the message."""
    jobs: list[tuple[Callable[..., Any], tuple]] = []

    def runner(f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        jobs.append((lambda: maybeDeferred(f, *args).chainDeferred(d), ()))
        return d

    clock = Clock()
    clock.advance(NOW)
    spool = Spool(str(tmp_path), clock=clock, runner=runner)
    spool.recover()
    s = ready(spool=spool, clock=clock)
    s.send(TRANSACTION)
    assert s.send(b"Subject: real\r\n\r\n..dot\r\n.\r\n") == b""
    while jobs:
        job, _ = jobs.pop(0)
        job()
    out = s.read()
    assert out.startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = out.split()[-1].decode()
    assert spool.ids() == [queue_id]
    envelope = spool.load(queue_id)
    assert envelope.sender == "s@x.test"
    assert [r.address for r in envelope.recipients] == ["u@example.org"]
    with spool.open_message(queue_id) as f:
        data = f.read()
    assert data.startswith(b"Received: from client.test")
    assert data.endswith(b"Subject: real\r\n\r\n.dot\r\n")
    assert envelope.size == len(data)
    assert not os.listdir(os.path.join(str(tmp_path), "tmp"))


def test_real_spool_refused_message_leaves_nothing(tmp_path: Any) -> None:
    """With the on-disk spool, a refused message leaves no file behind."""
    clock = Clock()
    spool = Spool(str(tmp_path), clock=clock, runner=lambda f, *a: maybeDeferred(f, *a))
    spool.recover()
    s = ready(spool=spool, clock=clock)
    assert deliver(s, b"bare\nlf\r\n.\r\n") == R.BARE_NEWLINE_DATA.to_bytes()
    assert spool.ids() == []
    assert not os.listdir(os.path.join(str(tmp_path), "tmp"))


# -- real sockets ------------------------------------------------------------------------------------


class LoopbackTests(TrialTestCase):
    """smtplib talks to the server over a real loopback socket, in clear and with STARTTLS."""

    def start(self, tls_context: Any = None) -> tuple[int, FakeSpool]:
        from twisted.internet import reactor

        spool = FakeSpool()
        server = ServerConfig(trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),))
        factory = SMTPServerFactory(HOST, server, spool, RelayPolicy(server), reactor,
                                    tls_context=tls_context)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, spool

    def test_smtplib_with_starttls(self) -> Deferred:
        """smtplib upgrades with STARTTLS, sends a message, and the envelope records ESMTPS and the cipher."""
        import smtplib
        import ssl as stdlib_ssl
        import tempfile

        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from twisted.internet import ssl as twisted_ssl
        from twisted.internet.threads import deferToThread

        from certs import make_certificate

        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        cert, key = make_certificate(directory, "relay.test", ("127.0.0.1",))
        context = twisted_ssl.CertificateOptions(
            privateKey=load_pem_private_key(key.read_bytes(), None),
            certificate=x509.load_pem_x509_certificate(cert.read_bytes()))
        port, spool = self.start(context)

        def client() -> tuple:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("tls.client.test")
                assert s.has_extn("starttls")
                tls = stdlib_ssl.create_default_context()
                tls.check_hostname = False
                tls.verify_mode = stdlib_ssl.CERT_NONE
                s.starttls(context=tls)
                s.ehlo("tls.client.test")
                starttls_after = s.has_extn("starttls")
                s.sendmail("s@x.test", ["u@elsewhere.test"], b"Subject: tls\r\n\r\nsecret\r\n")
            return starttls_after

        def check(starttls_after: bool) -> None:
            self.assertFalse(starttls_after)
            message = spool.committed[0]
            self.assertEqual(message.envelope.client.protocol, "ESMTPS")
            self.assertRegex(message.envelope.client.tls, r"^TLSv1\.[23] \S+$")
            self.assertTrue(bytes(message.data).endswith(b"Subject: tls\r\n\r\nsecret\r\n"))

        return deferToThread(client).addCallback(check)

    def test_smtplib_pipelined_clear(self) -> Deferred:
        """A plain smtplib session delivers two messages with pipelined commands over loopback."""
        import smtplib

        from twisted.internet.threads import deferToThread

        port, spool = self.start()

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@x.test", ["b@y.test", "c@y.test"], b"Subject: one\r\n\r\n.dot\r\n")
                s.sendmail("", ["d@y.test"], b"Subject: two\r\n\r\nbody\r\n")

        def check(_: None) -> None:
            self.assertEqual([m.envelope.sender for m in spool.committed], ["a@x.test", ""])
            self.assertTrue(bytes(spool.committed[0].data).endswith(b"\r\n\r\n.dot\r\n"))

        return deferToThread(client).addCallback(check)


# -- logging ---------------------------------------------------------------------------------------


def test_log_lines_carry_queue_id(monkeypatch: Any) -> None:
    """Connection, acceptance (queue id, sender, count, size), refusal (with queue id) and disconnection are logged."""
    from twisted.logger import Logger, formatEvent

    import relay.smtp.receive as receive_module
    import relay.smtp.server as server_module

    events: list[dict] = []
    logger = Logger(namespace="test", observer=events.append)
    monkeypatch.setattr(server_module, "log", logger)
    monkeypatch.setattr(receive_module, "log", logger)
    s = ready()
    deliver(s, b"ok\r\n.\r\n")
    deliver(s, b"bad\nlf\r\n.\r\n")
    s.send(b"RCPT TO:<x@y.test>\r\n")
    s.proto.connectionLost(Failure(ConnectionError()))
    lines = [formatEvent(e) for e in events]
    assert lines[0] == "connect from [192.0.2.7]:40000"
    assert "Q0001: accepted from [192.0.2.7]:40000 <s@x.test>, 1 recipients, " in lines[1]
    assert lines[2].startswith("Q0002: refused message from [192.0.2.7]:40000 <s@x.test>: 554 5.6.0")
    assert lines[3] == "RCPT refused from [192.0.2.7]:40000: 503 5.5.1 Error: need MAIL command"
    assert lines[-1] == "disconnect from [192.0.2.7]:40000"
    assert [e["queue_id"] for e in events if "queue_id" in e] == ["Q0001", "Q0002"]


def test_policy_answer_of_wrong_type_answers_451() -> None:
    """A policy answering something that is not a Reply gets 451 4.3.0, and the session goes on."""
    class Confused(RelayPolicy):
        def check_recipient(self, *args: Any) -> Any:
            return succeed("yes please")

    s = ready(policy=Confused(ServerConfig()))
    out = s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@example.org>\r\nNOOP\r\n")
    assert out == b"250 2.1.0 Ok\r\n451 4.3.0 Error: internal error, try again later\r\n250 2.0.0 Ok\r\n"


# -- Reply ---------------------------------------------------------------------------------------------


def test_reply_wire_form_multiline() -> None:
    """A multi-line Reply repeats code and status on each line, with "-" on all but the last."""
    reply = Reply(550, "5.1.1", "no such user\nreally")
    assert reply.to_bytes() == b"550-5.1.1 no such user\r\n550 5.1.1 really\r\n"
    assert str(reply) == "550 5.1.1 no such user really"


def test_reply_wire_form_strips_controls() -> None:
    """Control characters in a reply text never reach the wire as such."""
    assert Reply(550, "5.7.1", "no\rmail\x00here").to_bytes() == b"550 5.7.1 no mail here\r\n"


@pytest.mark.parametrize("lines, expected", [
    ([b"250 2.1.0 Ok\r\n"], Reply(250, "2.1.0", "Ok")),
    ([b"550-5.1.1 no such\r\n", b"550 5.1.1 user\r\n"], Reply(550, "5.1.1", "no such\nuser")),
    (["250-relay.test", "250-PIPELINING", "250 SIZE 10"], Reply(250, "", "relay.test\nPIPELINING\nSIZE 10")),
    ([b"451 try later"], Reply(451, "", "try later")),
    ([b"451 5.0.0 mismatched class"], Reply(451, "", "5.0.0 mismatched class")),
    ([b"220"], Reply(220, "", "")),
])
def test_reply_parse(lines: list, expected: Reply) -> None:
    """Reply.parse reads remote replies, with or without enhanced status codes."""
    assert Reply.parse(lines) == expected


@pytest.mark.parametrize("code, texts, expected", [
    (250, ["2.1.0 Ok"], Reply(250, "2.1.0", "Ok")),
    (550, ["5.1.1 no such", "5.1.1 user"], Reply(550, "5.1.1", "no such\nuser")),
    (451, ["5.0.0 mismatched class"], Reply(451, "", "5.0.0 mismatched class")),
    (220, [""], Reply(220, "", "")),
])
def test_reply_from_texts(code: int, texts: list, expected: Reply) -> None:
    """Reply.from_texts builds the reply from lines already split off the wire, as Reply.parse would."""
    assert Reply.from_texts(code, texts) == expected
    assert Reply.parse([f"{code} {text}" for text in texts]) == expected


@pytest.mark.parametrize("lines", [[], [b"hello"], [b"25 x"], [b"250-a", b"251 b"], [b"250x"]])
def test_reply_parse_malformed(lines: list) -> None:
    """Reply.parse raises ValueError on lines that are not an SMTP reply."""
    with pytest.raises(ValueError):
        Reply.parse(lines)


def test_reply_round_trip() -> None:
    """Every reply constant parses back from its wire form."""
    for value in vars(R).values():
        if isinstance(value, Reply):
            assert Reply.parse(value.to_bytes().splitlines()) == value


# -- AUTH (RFC 4954) ---------------------------------------------------------------------------------

PASSWORD = b"s3cret-Pa55"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_OK = b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n"
PLAIN_BAD = b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"


def make_portal() -> Portal:
    return Portal(SubmitterRealm(), [InMemoryUsernamePasswordDatabaseDontUse(alice=PASSWORD)])


@implementer(ISSLTransport)
class TLSTransport(RecordingTransport):
    """A transport that is TLS from the start, as on an implicit-TLS (ssl:) listener."""

    def getPeerCertificate(self) -> None:
        return None


class TLSSession(Session):
    """A session accepted on an implicit-TLS listener."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.transport = TLSTransport(IPv4Address("TCP", "192.0.2.7", 40000))
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)


def auth_ready(**kwargs: Any) -> Session:
    """A session after EHLO on which AUTH is offered (in clear, by auth_in_clear)."""
    kwargs.setdefault("portal", make_portal())
    kwargs.setdefault("auth_in_clear", True)
    return ready(**kwargs)


def test_auth_not_offered_in_clear() -> None:
    """With a portal but no TLS, EHLO does not offer AUTH and AUTH gets 538 5.7.11."""
    s = session(portal=make_portal(), tls_context=object())
    assert b"AUTH" not in s.send(b"EHLO c.test\r\n")
    assert s.send(PLAIN_OK) == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    assert s.proto.auth_user == ""


def test_auth_offered_after_starttls() -> None:
    """After STARTTLS the new EHLO offers AUTH PLAIN LOGIN, and AUTH works."""
    s = ready(portal=make_portal(), tls_context=object())
    s.send(b"STARTTLS\r\n")
    ehlo = s.send(b"EHLO c.test\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in ehlo and b"STARTTLS" not in ehlo
    assert s.send(PLAIN_OK) == b"235 2.7.0 Authentication successful\r\n"
    assert s.proto.auth_user == "alice"


def test_auth_offered_with_auth_in_clear() -> None:
    """auth_in_clear offers AUTH without TLS."""
    s = session(portal=make_portal(), auth_in_clear=True)
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.send(b"EHLO c.test\r\n")


def test_auth_without_portal() -> None:
    """Without auth_users there is no AUTH, even on TLS: 503 5.5.1."""
    s = TLSSession(make_factory())
    s.read()
    assert b"AUTH" not in s.send(b"EHLO c.test\r\n")
    assert s.send(PLAIN_OK) == b"503 5.5.1 Error: authentication not enabled\r\n"


def test_implicit_tls_session() -> None:
    """On an implicit-TLS listener the session is TLS at once: no STARTTLS, AUTH offered, ESMTPSA."""
    s = TLSSession(make_factory(portal=make_portal(), tls_context=object()))
    s.read()
    ehlo = s.send(b"EHLO c.test\r\n")
    assert b"STARTTLS" not in ehlo and b"250-AUTH PLAIN LOGIN\r\n" in ehlo
    assert code(s.send(b"STARTTLS\r\n")) == "503 5.5.1"
    s.send(PLAIN_OK)
    s.send(b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\nDATA\r\nx\r\n.\r\n")
    message = spool_of(s).committed[0]
    assert message.envelope.client.protocol == "ESMTPSA" and message.envelope.client.auth_user == "alice"
    assert b"\t(using TLS)\r\n\tby relay.test (relay) with ESMTPSA id Q0001\r\n" in bytes(message.data)


def test_plain_initial_response_success_relays_anywhere() -> None:
    """AUTH PLAIN with an initial response: 235 2.7.0, then an untrusted client may relay anywhere."""
    s = auth_ready()
    assert code(s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\n")[14:]) == "554 5.7.1"
    s.send(b"RSET\r\n")
    assert s.send(PLAIN_OK) == b"235 2.7.0 Authentication successful\r\n"
    out = s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\nDATA\r\nx\r\n.\r\n")
    assert out.endswith(b"250 2.0.0 Ok: queued as Q0001\r\n")
    client = spool_of(s).committed[0].envelope.client
    assert (client.auth_user, client.protocol, client.trusted) == ("alice", "ESMTPA", False)


def test_plain_with_challenge() -> None:
    """AUTH PLAIN alone gets an empty 334 challenge; the response then authenticates."""
    s = auth_ready()
    assert s.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.send(b64(b"alice\0alice\0" + PASSWORD) + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"


def test_login_exchange() -> None:
    """AUTH LOGIN asks Username: then Password: in base64 and authenticates."""
    s = auth_ready()
    assert s.send(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.send(b64(b"alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.send(b64(PASSWORD) + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert s.proto.auth_user == "alice"


def test_login_with_initial_response() -> None:
    """AUTH LOGIN with the user name as initial response goes straight to Password:."""
    s = auth_ready()
    assert s.send(b"auth login " + b64(b"alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.send(b64(PASSWORD) + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"


def test_failure_answered_after_delay_with_input_paused() -> None:
    """A wrong password gets 535 5.7.8 only after one second on the clock; pipelined commands wait."""
    s = auth_ready()
    clock = s.factory.clock
    assert s.send(PLAIN_BAD + b"NOOP\r\n") == b""
    clock.advance(0.99)
    assert s.read() == b""
    clock.advance(0.01)
    assert s.read() == b"535 5.7.8 Error: authentication failed\r\n250 2.0.0 Ok\r\n"
    assert s.proto.auth_user == "" and not s.closed


def test_login_failure_and_unknown_user() -> None:
    """LOGIN with an unknown user fails like a wrong password, after the delay."""
    s = auth_ready()
    s.send(b"AUTH LOGIN\r\n")
    s.send(b64(b"mallory") + b"\r\n")
    assert s.send(b64(PASSWORD) + b"\r\n") == b""
    s.factory.clock.advance(1)
    assert s.read() == b"535 5.7.8 Error: authentication failed\r\n"


def test_authorization_identity_of_another_user_refused() -> None:
    """PLAIN asking to act as another user (authzid) is refused with 535."""
    s = auth_ready()
    s.send(b"AUTH PLAIN " + b64(b"bob\0alice\0" + PASSWORD) + b"\r\n")
    s.factory.clock.advance(1)
    assert code(s.read()) == "535 5.7.8" and s.proto.auth_user == ""


def test_failure_limit_closes_session() -> None:
    """The third failed AUTH in a session gets 535 then 421 4.7.0, and the connection closes."""
    s = auth_ready()
    for _ in range(2):
        s.send(PLAIN_BAD)
        s.factory.clock.advance(1)
        assert code(s.read()) == "535 5.7.8"
    s.send(PLAIN_BAD)
    s.factory.clock.advance(1)
    assert s.read() == (b"535 5.7.8 Error: authentication failed\r\n"
                        b"421 4.7.0 relay.test Error: too many authentication failures\r\n")
    assert s.closed


def test_cancel_exchange() -> None:
    """A "*" response cancels the exchange with 501 5.0.0 and commands work again."""
    s = auth_ready()
    s.send(b"AUTH LOGIN\r\n")
    assert s.send(b"*\r\n") == b"501 5.0.0 Authentication cancelled\r\n"
    assert s.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    s.send(b"AUTH PLAIN\r\n")
    assert s.send(b"*\r\n") == b"501 5.0.0 Authentication cancelled\r\n"


@pytest.mark.parametrize("lines", [
    [b"AUTH PLAIN !!notbase64\r\n"],
    [b"AUTH PLAIN\r\n", b"abc\r\n"],
    [b"AUTH LOGIN\r\n", b"YWxp?2U=\r\n"],
])
def test_bad_base64(lines: list[bytes]) -> None:
    """Responses that are not base64 get 501 5.5.2 and end the exchange."""
    s = auth_ready()
    for line in lines:
        out = s.send(line)
    assert out == b"501 5.5.2 Error: invalid base64 data\r\n"
    assert s.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("line, expected", [
    (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Error: unsupported authentication mechanism\r\n"),
    (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
    (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
    (b"AUTH PLAIN " + b64(b"no-nul-here") + b"\r\n", b"501 5.5.2 Error: malformed authentication data\r\n"),
])
def test_auth_syntax(line: bytes, expected: bytes) -> None:
    """Unknown mechanisms, a missing mechanism and malformed PLAIN data are refused at once."""
    assert auth_ready().send(line) == expected


def test_auth_twice_and_during_transaction() -> None:
    """AUTH after success or inside a mail transaction gets 503 5.5.1; before EHLO too."""
    s = session(portal=make_portal(), auth_in_clear=True)
    assert s.send(PLAIN_OK) == b"503 5.5.1 Error: send EHLO first\r\n"
    s.send(b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n")
    assert s.send(PLAIN_OK) == b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    s.send(b"RSET\r\n")
    assert code(s.send(PLAIN_OK)) == "235 2.7.0"
    assert s.send(PLAIN_OK) == b"503 5.5.1 Error: already authenticated\r\n"


def test_starttls_forgets_authentication() -> None:
    """An identity established in clear does not survive STARTTLS (RFC 3207 4.2)."""
    s = auth_ready(tls_context=object())
    s.send(PLAIN_OK)
    s.send(b"STARTTLS\r\n")
    assert s.proto.auth_user == ""


def test_long_auth_line_accepted_other_long_lines_refused() -> None:
    """An AUTH line over 512 octets is read whole (RFC 4954 allows 12288); other commands are not."""
    s = auth_ready()
    long_password = b"p" * 3000
    line = b"AUTH PLAIN " + b64(b"\0alice\0" + long_password) + b"\r\n"
    assert len(line) > 4000
    assert s.send(line[:2000]) == b""
    assert s.send(line[2000:]) == b""
    s.factory.clock.advance(1)
    assert s.read() == b"535 5.7.8 Error: authentication failed\r\n"
    s.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n")
    assert s.send(b64(b"q" * 1500) + b"\r\n") == b""
    s.factory.clock.advance(1)
    assert code(s.read()) == "535 5.7.8"
    assert s.send(b"NOOP " + b"x" * 600 + b"\r\n") == b"500 5.5.6 Error: line too long\r\n"


def test_auth_parameter_of_mail_accepted() -> None:
    """MAIL FROM with AUTH=<> is accepted where AUTH is offered (RFC 4954 5)."""
    s = auth_ready()
    assert s.send(b"MAIL FROM:<s@x.test> AUTH=<>\r\n") == b"250 2.1.0 Ok\r\n"


def test_password_absent_from_logs(monkeypatch: Any) -> None:
    """Log events of successful, failed and refused AUTH carry the user name and never the password."""
    from twisted.logger import Logger, formatEvent

    events: list[dict] = []
    logger = Logger(namespace="test", observer=events.append)
    monkeypatch.setattr(server_module, "log", logger)
    monkeypatch.setattr(sasl_module, "log", logger)
    s = auth_ready()
    s.send(PLAIN_BAD)
    s.factory.clock.advance(1)
    s.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b"%%" + PASSWORD + b"\r\n")
    s.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(PASSWORD) + b"\r\n")
    text = "\n".join(formatEvent(e) for e in events) + repr(events)
    assert "AUTH PLAIN as 'alice' from [192.0.2.7]:40000: failed (1 of 3)" in text
    assert "AUTH LOGIN as alice from [192.0.2.7]:40000: success" in text
    for secret in (PASSWORD, b"wrong", b64(PASSWORD), b64(b"\0alice\0wrong")):
        assert secret.decode() not in text


# -- submission (RFC 6409) ------------------------------------------------------------------------------------


def submit(s: Session, data: bytes) -> bytes:
    s.send(PLAIN_OK)
    s.send(b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\nDATA\r\n")
    out = s.send(data)
    assert code(out) == "250 2.0.0", out
    return bytes(spool_of(s).committed[-1].data)


def test_submission_adds_message_id_and_date() -> None:
    """A submitted message lacking Message-ID and Date gets both right after our Received header."""
    s = auth_ready(submission=True)
    stored = submit(s, b"Subject: hi\r\nFrom: alice@x.test\r\n\r\nbody\r\n.\r\n")
    header, _, rest = stored.partition(b"\r\nMessage-ID: ")
    assert header.startswith(b"Received: ") and header.endswith(DATE.encode())
    assert rest == (b"<20231114221320.Q0001@relay.test>\r\nDate: " + DATE.encode() +
                    b"\r\nSubject: hi\r\nFrom: alice@x.test\r\n\r\nbody\r\n")


def test_submission_keeps_existing_fields() -> None:
    """Existing Message-ID and Date (any case, folded) are kept and not added again; only the missing one is."""
    s = auth_ready(submission=True)
    body = b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id:\r\n <x@y>\r\n\r\nMessage-ID: <in-body>\r\n.\r\n"
    stored = submit(s, body)
    assert stored.endswith(b"+0000\r\n" + body[:-3]) and stored.count(b"Message-ID") == 1
    stored = submit_again(s, b"Message-ID: <a@b>\r\n\r\nx\r\n.\r\n")
    assert b"\r\nDate: " + DATE.encode() + b"\r\nMessage-ID: <a@b>\r\n\r\nx\r\n" in stored


def submit_again(s: Session, data: bytes) -> bytes:
    s.send(b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\nDATA\r\n")
    assert code(s.send(data)) == "250 2.0.0"
    return bytes(spool_of(s).committed[-1].data)


def test_submission_fields_with_header_only_and_split_stream() -> None:
    """A message of headers only, sent in tiny pieces, still gets its fields before its header section."""
    s = auth_ready(submission=True)
    s.send(PLAIN_OK)
    s.send(b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\nDATA\r\n")
    data = b"Subject: only headers\r\nX-A: 1\r\n.\r\n"
    for i in range(len(data)):
        out = s.send(data[i:i + 1])
    assert code(out) == "250 2.0.0"
    stored = bytes(spool_of(s).committed[0].data)
    assert stored.endswith(b"\r\nDate: " + DATE.encode() + b"\r\nSubject: only headers\r\nX-A: 1\r\n")
    assert b"\r\nMessage-ID: <20231114221320.Q0001@relay.test>\r\n" in stored


def test_submission_body_without_headers() -> None:
    """A message whose first line is not a header field gets the fields before it, once."""
    s = auth_ready(submission=True)
    stored = submit(s, b"just text\r\nmore: text\r\n.\r\n")
    assert stored.endswith(b"\r\nDate: " + DATE.encode() + b"\r\njust text\r\nmore: text\r\n")
    assert stored.count(b"Message-ID:") == 1


def test_plain_listener_adds_nothing() -> None:
    """A message received on an ordinary listener is stored as sent."""
    s = auth_ready()
    stored = submit(s, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert b"Message-ID" not in stored and stored.endswith(DATE.encode() + b"\r\nSubject: hi\r\n\r\nbody\r\n")


def test_received_auth_header() -> None:
    """With received_auth the Received header names the authenticated sender; without, it does not."""
    s = auth_ready(received_auth=True)
    stored = submit(s, b"x\r\n.\r\n")
    assert stored.startswith(
        b"Received: from client.test ([192.0.2.7])\r\n"
        b"\t(Authenticated sender: alice)\r\n"
        b"\tby relay.test (relay) with ESMTPA id Q0001\r\n")
    assert b"Authenticated sender" not in submit(auth_ready(), b"x\r\n.\r\n")


def test_received_tls_comment_names_version_and_cipher() -> None:
    """On TLS the Received header carries "(using <version> with cipher <cipher>)"."""
    class Handle:
        def get_protocol_version_name(self) -> str:
            return "TLSv1.3"

        def get_cipher_name(self) -> str:
            return "TLS_AES_256_GCM_SHA384"

    s = TLSSession(make_factory(portal=make_portal(), received_auth=True))
    s.transport.getHandle = Handle  # type: ignore[method-assign]
    s.send(b"EHLO c.test\r\n")
    stored = submit(s, b"x\r\n.\r\n")
    assert (b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n\t(Authenticated sender: alice)\r\n"
            b"\tby relay.test (relay) with ESMTPSA id") in stored


def test_sender_login_map(tmp_path: Any) -> None:
    """With a sender login map an authenticated client may only use its own senders: else 553 5.7.1."""
    path = tmp_path / "senders"
    path.write_text("alice@x.test alice\n")
    server = ServerConfig(relay_domains=("example.org",))
    policy = RelayPolicy(server, sender_logins=SenderLoginMap(str(path), lambda f, *a: maybeDeferred(f, *a)))
    s = auth_ready(policy=policy, submission=True)
    s.send(PLAIN_OK)
    assert s.send(b"MAIL FROM:<bob@x.test>\r\n") == (
        b"553 5.7.1 <bob@x.test>: Sender address rejected: not owned by user alice\r\n")
    assert s.send(b"MAIL FROM:<alice@x.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert s.send(b"RSET\r\nMAIL FROM:<>\r\n") == b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"


# -- ETRN (RFC 1985) ------------------------------------------------------------------------------------


class EtrnHook:
    def __init__(self, result: Any = 2) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.result = result

    def __call__(self, domain: str, subdomains: bool) -> Any:
        self.calls.append((domain, subdomains))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_etrn_from_trusted_client() -> None:
    """A trusted client's ETRN starts the queue for the domain (or its subdomains) with 250."""
    hook = EtrnHook()
    s = ready(peer=IPv4Address("TCP", "127.0.0.1", 1), etrn=hook)
    assert s.send(b"ETRN Example.ORG\r\n") == b"250 2.0.0 Queuing for node Example.ORG started\r\n"
    assert s.send(b"ETRN @example.org\r\n") == b"250 2.0.0 Queuing for node example.org started\r\n"
    assert hook.calls == [("example.org", False), ("example.org", True)]


def test_etrn_from_authenticated_client() -> None:
    """An untrusted but authenticated client may use ETRN."""
    hook = EtrnHook(succeed(0))
    s = auth_ready(etrn=hook)
    s.send(PLAIN_OK)
    assert code(s.send(b"ETRN example.org\r\n")) == "250 2.0.0"
    assert hook.calls == [("example.org", False)]


def test_etrn_from_untrusted_client_refused() -> None:
    """An untrusted, unauthenticated client gets 459 4.7.1 and nothing is started."""
    hook = EtrnHook()
    s = ready(etrn=hook)
    assert s.send(b"ETRN example.org\r\n") == b"459 4.7.1 Node example.org not allowed: access denied\r\n"
    assert hook.calls == []


@pytest.mark.parametrize("line, expected", [
    (b"ETRN\r\n", b"501 5.5.4 Syntax: ETRN domain\r\n"),
    (b"ETRN a.test b.test\r\n", b"501 5.5.4 Syntax: ETRN domain\r\n"),
    (b"ETRN bad..domain\r\n", b"501 5.5.4 Error: invalid domain name in ETRN\r\n"),
    (b"ETRN @\r\n", b"501 5.5.4 Error: invalid domain name in ETRN\r\n"),
    (b"ETRN #queue\r\n", b"459 4.3.3 Error: queue names are not supported\r\n"),
])
def test_etrn_syntax(line: bytes, expected: bytes) -> None:
    """ETRN without a valid node name is a syntax error; queue names are not supported."""
    hook = EtrnHook()
    assert ready(peer=IPv4Address("TCP", "127.0.0.1", 1), etrn=hook).send(line) == expected
    assert hook.calls == []


def test_etrn_state_and_unavailable() -> None:
    """ETRN before HELO or inside a transaction is 503; without a hook or when it fails, 458 4.3.0."""
    trusted = IPv4Address("TCP", "127.0.0.1", 1)
    s = session(peer=trusted, etrn=EtrnHook())
    assert code(s.send(b"ETRN a.test\r\n")) == "503 5.5.1"
    s.send(b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n")
    assert s.send(b"ETRN a.test\r\n") == b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    assert ready(peer=trusted).send(b"ETRN a.test\r\n") == b"458 4.3.0 Unable to queue messages for node a.test\r\n"
    failing = ready(peer=trusted, etrn=EtrnHook(RuntimeError("scheduler gone")))
    assert failing.send(b"ETRN a.test\r\n") == b"458 4.3.0 Unable to queue messages for node a.test\r\n"


# -- graceful shutdown ------------------------------------------------------------------------------------


SHUTDOWN = b"421 4.3.2 relay.test Service shutting down, closing transmission channel\r\n"


def test_stopping_closes_idle_sessions() -> None:
    """stopping() answers 421 4.3.2 to idle sessions, closes them, and fires once they are gone."""
    factory = make_factory()
    first, second = Session(factory), Session(factory)
    first.read(), second.read()
    second.send(b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n")
    d = factory.stopping()
    assert first.read() == SHUTDOWN and second.read() == SHUTDOWN
    assert first.closed and second.closed
    assert not d.called
    first.proto.connectionLost(Failure(ConnectionError()))
    second.proto.connectionLost(Failure(ConnectionError()))
    assert d.called
    assert first.send(b"NOOP\r\n") == b""


def test_stopping_lets_data_finish_then_421() -> None:
    """A session in DATA finishes its message (250 after the commit) and then gets 421."""
    factory = make_factory()
    s = Session(factory)
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION + b"Subject: x\r\n")
    d = factory.stopping()
    assert s.read() == b"" and not s.closed
    assert s.send(b"\r\nbody\r\n.\r\nQUIT\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n" + SHUTDOWN
    assert s.closed and spool_of(s).committed
    s.proto.connectionLost(Failure(ConnectionError()))
    assert d.called


def test_stopping_grace_period_cuts_off_slow_sessions() -> None:
    """A message still in DATA when the grace period ends is aborted, the session gets 421 and closes."""
    factory = make_factory()
    s = Session(factory)
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION + b"partial")
    d = factory.stopping()
    factory.clock.advance(factory_module.SHUTDOWN_GRACE)
    assert s.read() == SHUTDOWN and s.closed and d.called
    assert spool_of(s).messages[0].state == "aborted"


def test_stopping_with_no_sessions_and_late_connections() -> None:
    """stopping() without sessions fires at once; a connection arriving afterwards gets 421 at greeting."""
    factory = make_factory()
    assert factory.stopping().called
    s = Session(factory)
    assert s.read() == SHUTDOWN and s.closed and factory.sessions == 0


def test_stopping_waits_for_pending_answer() -> None:
    """A session waiting for an answer (a slow policy) gets it, then 421."""
    pending: Deferred = Deferred()

    class Waiting(RelayPolicy):
        def check_recipient(self, *args: Any) -> Deferred:
            return pending

    factory = make_factory(policy=Waiting(ServerConfig()))
    s = Session(factory)
    s.read()
    s.send(b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<u@example.org>\r\n")
    factory.stopping()
    assert s.read() == b"" and not s.closed
    pending.callback(None)
    assert s.read() == b"250 2.1.5 Ok\r\n" + SHUTDOWN and s.closed


def test_overlong_auth_response_ends_exchange() -> None:
    """An AUTH response over 12288 octets gets 500 5.5.6 and the exchange ends: the next line is a command."""
    s = auth_ready()
    s.send(b"AUTH PLAIN\r\n")
    assert s.send(b"A" * 13000) == b"500 5.5.6 Error: line too long\r\n"
    assert s.send(b"AAAA\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n"
