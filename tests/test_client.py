"""Tests for relay.smtp.client: the outbound SMTP client protocol.

The protocol is driven over StringTransport with a Clock; one test runs the
client under the real reactor (in a subprocess) against aiosmtpd on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from relay.smtp.client import SMTPClientProtocol
from relay.smtp.transaction import ClientOptions, ClientTimeouts, SessionError, Transaction, TransactionResult
from relay.outcome import LocalReply, Reason
from relay.smtp.replies import Reply
from relay.smtp.stream import DotStuffer, MessageProducer

REPO = Path(__file__).resolve().parent.parent

ALL_CAPS = ("PIPELINING", "SIZE 10000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
MESSAGE = b"Subject: hi\r\n\r\nHello\r\n.hidden\r\n.\r\nend\r\n"
TIMEOUTS = ClientTimeouts(connect=1, greeting=2, ehlo=3, mail=4, rcpt=5, data_init=6, data_block=7, final_dot=8, idle=9)


class CountingTransport(StringTransport):
    """A StringTransport that remembers each write separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class _Handle:
    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


@implementer(ITLSTransport)
class TLSTransport(CountingTransport):
    """A StringTransport that records startTLS and exposes a fake OpenSSL handle."""

    tls_context = None

    def startTLS(self, context, normal=True) -> None:
        self.tls_context = context

    def getHandle(self) -> _Handle:
        return _Handle()


def transaction(
    recipients=("a@dest.test",),
    message: bytes = MESSAGE,
    sender: str = "s@src.test",
    **kw,
) -> Transaction:
    rcpts = tuple((r, ()) if isinstance(r, str) else r for r in recipients)
    return Transaction(sender, rcpts, len(message), open_message=lambda: io.BytesIO(message), queue_id="Q1", **kw)


def pump(transport: StringTransport) -> None:
    """Do what a real transport does for a pull producer: ask until it unregisters."""
    for _ in range(100000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2 on the receiving side; asserts the data ends with a lone '.' line."""
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"", "data does not end with CRLF"
    lines = lines[:-1]
    assert lines[-1] == b".", "data does not end with '.'"
    body = lines[:-1]
    assert b"." not in body, "a lone '.' line before the end"
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in body)


class ClientTestCase(SynchronousTestCase):
    def connect(self, options: ClientOptions | None = None, transport: StringTransport | None = None):
        self.clock = Clock()
        self.transport = transport or CountingTransport()
        self.proto = SMTPClientProtocol(options or ClientOptions("relay.test", timeouts=TIMEOUTS), "mx.test", self.clock)
        self.proto.makeConnection(self.transport)
        return self.proto

    def server(self, *lines: str) -> None:
        self.proto.dataReceived("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        if isinstance(self.transport, CountingTransport):
            self.transport.writes.clear()
        return value

    def ehlo_lines(self, caps) -> list[str]:
        lines = ["mx.test hello"] + list(caps)
        return [f"250-{l}" for l in lines[:-1]] + [f"250 {lines[-1]}"]

    def ready(self, caps=ALL_CAPS, options: ClientOptions | None = None, transport=None) -> SMTPClientProtocol:
        self.connect(options, transport)
        self.server("220 mx.test ESMTP")
        self.assertEqual(self.sent(), b"EHLO relay.test\r\n")
        self.server(*self.ehlo_lines(caps))
        self.assertIs(self.successResultOf(self.proto.ready), self.proto)
        self.sent()
        return self.proto

    def session_error(self, d) -> SessionError:
        return self.failureResultOf(d, SessionError).value


class SessionSetupTests(ClientTestCase):
    def test_greeting_and_ehlo_make_the_session_ready(self):
        """A 220 greeting and a 250 EHLO fire ready and record the capabilities, upper-cased."""
        self.connect()
        self.server("220 mx.test ESMTP")
        self.assertEqual(self.sent(), b"EHLO relay.test\r\n")
        self.server("250-mx.test", "250-pipelining", "250-SIZE 1000", "250 AUTH PLAIN LOGIN")
        self.assertIs(self.successResultOf(self.proto.ready), self.proto)
        self.assertEqual(self.proto.capabilities, {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN"})
        self.assertFalse(self.proto.busy)
        self.assertFalse(self.proto.closed)

    def test_greeting_421_is_transient_and_closes_without_quit(self):
        """A 421 greeting fails ready with a transient greeting error and closes without QUIT."""
        self.connect()
        self.server("421 4.3.2 busy")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage), (True, "greeting"))
        self.assertEqual(err.reply, Reply(421, "4.3.2", "busy"))
        self.assertEqual(self.sent(), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.proto.closed)

    def test_greeting_554_is_permanent_and_sends_quit(self):
        """A 554 greeting fails ready permanently, sends QUIT and closes."""
        self.connect()
        self.server("554 5.7.1 go away")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage, err.reply.code), (False, "greeting", 554))
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_ehlo_5xx_falls_back_to_helo(self):
        """A 502 to EHLO makes the client say HELO; a 250 then makes the session ready without extensions."""
        self.connect()
        self.server("220 mx.test")
        self.sent()
        self.server("502 5.5.2 what?")
        self.assertEqual(self.sent(), b"HELO relay.test\r\n")
        self.server("250 mx.test")
        self.assertIs(self.successResultOf(self.proto.ready), self.proto)
        self.assertEqual(self.proto.capabilities, {})

    def test_helo_refused_after_ehlo_refused_is_permanent(self):
        """A 5xx to HELO after a 5xx to EHLO fails ready permanently at stage ehlo."""
        self.connect()
        self.server("220 mx.test")
        self.server("500 no")
        self.server("550 5.7.1 not you")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage, err.reply.code), (False, "ehlo", 550))

    def test_ehlo_4xx_is_transient(self):
        """A 4xx to EHLO fails ready with a transient error at stage ehlo (no HELO)."""
        self.connect()
        self.server("220 mx.test")
        self.sent()
        self.server("451 4.3.0 later")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage), (True, "ehlo"))
        self.assertEqual(self.sent(), b"QUIT\r\n")

    def test_multiline_reply_with_enhanced_codes(self):
        """A multi-line reply becomes one Reply with the enhanced status split out and the lines joined."""
        self.ready(caps=())
        d = self.proto.send(transaction())
        self.server("550-5.1.1 no such", "550 5.1.1 user here")
        result = self.successResultOf(d)
        self.assertEqual(result.replies["a@dest.test"], Reply(550, "5.1.1", "no such\nuser here"))

    def test_garbage_reply_is_a_transient_protocol_error(self):
        """A line that is no SMTP reply fails the session transiently and drops the connection."""
        self.connect()
        self.server("HTTP/1.1 400 Bad Request")
        err = self.session_error(self.proto.ready)
        self.assertTrue(err.transient)
        self.assertEqual((err.stage, err.reason), ("greeting", Reason.PROTOCOL))
        self.assertTrue(self.transport.disconnecting)

    def test_inconsistent_multiline_codes_are_a_protocol_error(self):
        """A multi-line reply whose lines carry different codes is a protocol error."""
        self.connect()
        self.server("220-mx.test", "250 oops")
        self.assertTrue(self.session_error(self.proto.ready).transient)

    def test_unsolicited_reply_during_a_transaction_is_a_protocol_error(self):
        """A reply nobody waits for (beyond the pipelined group) fails the transaction transiently."""
        self.ready()
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok", "354 go", "250 extra", "250 extra")
        err = self.session_error(d)
        self.assertEqual((err.transient, err.stage), (True, "lost"))
        self.assertTrue(self.proto.closed)

    def test_overlong_reply_line_drops_the_connection(self):
        """A reply line beyond 64 KiB drops the connection with a transient error."""
        self.connect()
        self.proto.dataReceived(b"220 " + b"x" * 70000)
        err = self.session_error(self.proto.ready)
        self.assertTrue(err.transient)
        self.assertTrue(self.transport.disconnecting)

    def test_long_but_tolerated_reply_line(self):
        """A 4 KiB reply line (over the RFC's 512) is still understood."""
        self.connect()
        self.server("220 " + "x" * 4096)
        self.assertEqual(self.sent(), b"EHLO relay.test\r\n")

    def test_bare_lf_reply_lines_are_tolerated(self):
        """Replies ending in bare LF are read like CRLF ones."""
        self.connect()
        self.proto.dataReceived(b"220 mx.test\n")
        self.assertEqual(self.sent(), b"EHLO relay.test\r\n")


class UnsolicitedCloseTests(ClientTestCase):
    """A 421 nobody asked for (RFC 5321 3.8: the peer is shutting down) is one clear line, not a protocol error."""

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("relay.")]

    def test_421_on_an_idle_connection_closes_it_with_one_line(self):
        """An idle connection told 421 is closed (no QUIT), logged once with the reply, and never called a protocol error."""
        self.ready()
        self.server("421 4.4.2 mx.test Error: timeout exceeded")
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.sent(), b"")
        lines = [l for l in self.lines() if "mx.test" in l]
        self.assertEqual(lines, ["mx.test: the peer closes the connection: 421 4.4.2 mx.test Error: timeout exceeded"])
        self.assertFalse(any("protocol error" in l for l in self.lines()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(self.proto.send(transaction()), SessionError)  # at once: the connection is closed

    def test_421_while_the_message_streams_fails_the_transaction_with_the_reply(self):
        """A 421 arriving in the middle of DATA fails the transaction transiently, carrying the peer's reply."""
        self.ready()
        d = self.proto.send(transaction(message=b"x" * 200 + b"\r\n"))
        self.server("250 ok", "250 ok", "354 go")
        self.server("421 4.3.2 shutting down")
        err = self.session_error(d)
        self.assertEqual((err.transient, err.reply, err.reason), (True, Reply(421, "4.3.2", "shutting down"), Reason.LOST))
        self.assertTrue(self.proto.closed)
        self.assertFalse(any("protocol error" in l for l in self.lines()))

    def test_other_unsolicited_replies_are_still_protocol_errors(self):
        """Only 421 is a peer closing: any other reply nobody waits for is a protocol error."""
        self.ready()
        self.server("250 surprise")
        self.assertTrue(self.proto.closed)
        self.assertTrue(any("protocol error: unexpected reply" in l for l in self.lines()))


class TLSTests(ClientTestCase):
    def test_require_without_starttls_is_transient(self):
        """tls="require" toward a server without STARTTLS fails ready transiently at stage starttls; nothing is sent in clear."""
        self.connect(ClientOptions("relay.test", tls="require", timeouts=TIMEOUTS))
        self.server("220 mx.test")
        self.sent()
        self.server(*self.ehlo_lines(("PIPELINING",)))
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage), (True, "starttls"))
        self.assertEqual(self.sent(), b"QUIT\r\n")

    def test_verify_without_starttls_is_transient(self):
        """tls="verify" toward a server without STARTTLS fails like "require"."""
        self.connect(ClientOptions("relay.test", tls="verify", timeouts=TIMEOUTS))
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("8BITMIME",)))
        self.assertEqual(self.session_error(self.proto.ready).stage, "starttls")

    def test_may_without_starttls_goes_on_in_clear(self):
        """tls="may" toward a server without STARTTLS makes the session ready in clear."""
        self.ready(caps=("PIPELINING",))
        self.assertEqual(self.proto.tls, "")

    def test_starttls_then_ehlo_again(self):
        """STARTTLS offered: the client starts TLS, says EHLO again, and records version and cipher."""
        transport = TLSTransport()
        self.connect(ClientOptions("relay.test", tls="require", timeouts=TIMEOUTS), transport)
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("STARTTLS", "PIPELINING")))
        self.sent()
        self.server("220 2.0.0 go ahead")
        self.assertIsNotNone(transport.tls_context)
        self.assertEqual(self.sent(), b"EHLO relay.test\r\n")
        self.assertNoResult(self.proto.ready)
        self.server(*self.ehlo_lines(("PIPELINING", "SIZE 5000")))
        self.successResultOf(self.proto.ready)
        self.assertEqual(self.proto.capabilities, {"PIPELINING": "", "SIZE": "5000"})
        self.assertEqual(self.proto.tls, "TLSv1.3 TLS_AES_256_GCM_SHA384")
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok", "354 go")
        pump(transport)
        self.server("250 queued")
        self.assertEqual(self.successResultOf(d).tls, "TLSv1.3 TLS_AES_256_GCM_SHA384")

    def test_starttls_refused_with_require_is_transient(self):
        """A 454 to STARTTLS under tls="require" fails ready transiently at stage starttls."""
        self.connect(ClientOptions("relay.test", tls="require", timeouts=TIMEOUTS), TLSTransport())
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("STARTTLS",)))
        self.server("454 4.7.0 TLS not available")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage, err.reply.code), (True, "starttls", 454))

    def test_starttls_refused_with_may_goes_on_in_clear(self):
        """A 454 to STARTTLS under tls="may" makes the session ready in clear."""
        self.connect(ClientOptions("relay.test", tls="may", timeouts=TIMEOUTS), TLSTransport())
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("STARTTLS", "PIPELINING")))
        self.server("454 4.7.0 TLS not available")
        self.successResultOf(self.proto.ready)
        self.assertEqual(self.proto.tls, "")
        self.assertEqual(self.proto.capabilities["PIPELINING"], "")

    def test_connection_lost_during_handshake_is_a_starttls_failure(self):
        """The connection dropping after STARTTLS (a failed handshake) fails ready at stage starttls."""
        self.connect(ClientOptions("relay.test", tls="verify", tls_hostname="mx.test", timeouts=TIMEOUTS), TLSTransport())
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("STARTTLS",)))
        self.server("220 go ahead")
        self.proto.connectionLost(None)
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage), (True, "starttls"))


    def test_session_in_clear_after_a_failed_handshake_skips_starttls(self):
        """starttls=False (the retry of tls="may" after a failed handshake) does not send STARTTLS although it is offered."""
        self.connect(ClientOptions("relay.test", tls="may", starttls=False, timeouts=TIMEOUTS), TLSTransport())
        self.server("220 mx.test")
        self.sent()
        self.server(*self.ehlo_lines(("STARTTLS", "PIPELINING")))
        self.successResultOf(self.proto.ready)
        self.assertEqual(self.sent(), b"")
        self.assertEqual(self.proto.tls, "")

    def test_required_tls_ignores_starttls_false(self):
        """tls="require" starts TLS even with starttls=False: nothing required ever goes in clear."""
        self.connect(ClientOptions("relay.test", tls="require", starttls=False, timeouts=TIMEOUTS), TLSTransport())
        self.server("220 mx.test")
        self.sent()
        self.server(*self.ehlo_lines(("STARTTLS",)))
        self.assertEqual(self.sent(), b"STARTTLS\r\n")


class SourceAddressTests(SynchronousTestCase):
    def test_connect_binds_the_source_address_of_the_targets_ip_version(self):
        """connect() makes the connection from the configured local address of the target's IP version."""
        from twisted.internet.testing import MemoryReactorClock

        from relay.smtp.connect import connect

        reactor = MemoryReactorClock()
        options = ClientOptions("relay.test", source=("127.0.0.3", "::1"), timeouts=TIMEOUTS)
        connect(reactor, "127.0.0.2", 25, "mx.test", options)
        connect(reactor, "::1", 25, "mx6.test", options)
        connect(reactor, "127.0.0.2", 25, "mx.test", ClientOptions("relay.test", timeouts=TIMEOUTS))
        binds = [client[4] for client in reactor.tcpClients]
        self.assertEqual(binds, [("127.0.0.3", 0), ("::1", 0), None])


class AuthTests(ClientTestCase):
    PASSWORD = "s3cret-Pa55"

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def options(self, **kw) -> ClientOptions:
        kw.setdefault("auth_in_clear", True)
        return ClientOptions("relay.test", username="relay", password=self.PASSWORD, timeouts=TIMEOUTS, **kw)

    def assert_password_not_logged(self) -> None:
        secrets = [self.PASSWORD, base64.b64encode(self.PASSWORD.encode()).decode(),
                   base64.b64encode(b"\0relay\0" + self.PASSWORD.encode()).decode()]
        self.assertTrue(self.events, "nothing was logged")
        for event in self.events:
            text = formatEvent(event) + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)

    def start(self, auth: str) -> None:
        self.connect(self.options())
        self.server("220 mx.test")
        self.server(*self.ehlo_lines((auth,)))

    def test_auth_plain(self):
        """AUTH PLAIN sends the initial response; 235 makes the session ready; the password is never logged."""
        self.start("AUTH LOGIN PLAIN")
        token = base64.b64encode(b"\0relay\0" + self.PASSWORD.encode())
        self.assertEqual(self.sent(), b"EHLO relay.test\r\nAUTH PLAIN " + token + b"\r\n")
        self.server("235 2.7.0 ok")
        self.successResultOf(self.proto.ready)
        self.assert_password_not_logged()

    def test_auth_login(self):
        """AUTH LOGIN answers the user name and password prompts in base64."""
        self.start("AUTH LOGIN")
        self.assertTrue(self.sent().endswith(b"AUTH LOGIN\r\n"))
        self.server("334 VXNlcm5hbWU6")
        self.assertEqual(self.sent(), base64.b64encode(b"relay") + b"\r\n")
        self.server("334 UGFzc3dvcmQ6")
        self.assertEqual(self.sent(), base64.b64encode(self.PASSWORD.encode()) + b"\r\n")
        self.server("235 2.7.0 ok")
        self.successResultOf(self.proto.ready)
        self.assert_password_not_logged()

    def test_auth_failure_is_transient(self):
        """A 535 fails ready with a transient auth error whose text holds no password."""
        self.start("AUTH PLAIN")
        self.server("535 5.7.8 bad credentials")
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage, err.reply.code), (True, "auth", 535))
        self.assertNotIn(self.PASSWORD, str(err) + repr(err))
        self.assertNotIn(self.PASSWORD, repr(self.options()))
        self.assert_password_not_logged()

    def test_no_auth_in_clear(self):
        """Without TLS and without auth_in_clear no AUTH is sent and the session fails at stage auth."""
        self.connect(self.options(auth_in_clear=False))
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("AUTH PLAIN",)))
        err = self.session_error(self.proto.ready)
        self.assertEqual((err.transient, err.stage), (True, "auth"))
        self.assertNotIn(b"AUTH", self.sent())

    def test_auth_after_starttls(self):
        """With a username and STARTTLS, AUTH comes after TLS and the second EHLO."""
        transport = TLSTransport()
        self.connect(self.options(auth_in_clear=False, tls="require"), transport)
        self.server("220 mx.test")
        self.server(*self.ehlo_lines(("STARTTLS", "AUTH PLAIN")))
        self.server("220 go")
        self.sent()
        self.server(*self.ehlo_lines(("AUTH PLAIN",)))
        self.assertTrue(self.sent().startswith(b"AUTH PLAIN "))
        self.server("235 ok")
        self.successResultOf(self.proto.ready)

    def test_no_common_mechanism(self):
        """A server offering only unsupported mechanisms fails the session at stage auth."""
        self.start("AUTH CRAM-MD5")
        self.assertEqual(self.session_error(self.proto.ready).stage, "auth")


class TransactionTests(ClientTestCase):
    def test_pipelining_sends_mail_rcpts_data_in_one_write(self):
        """With PIPELINING, MAIL, every RCPT and DATA go out in one write."""
        self.ready()
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test")))
        self.assertEqual(self.transport.writes, [
            b"MAIL FROM:<s@src.test> SIZE=%d\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" % len(MESSAGE)
        ])
        self.assertTrue(self.proto.busy)
        self.sent()
        self.server("250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok", "354 go on")
        pump(self.transport)
        self.assertEqual(unstuff(self.sent()), MESSAGE)
        self.assertNoResult(d)
        self.server("250 2.0.0 queued as X")
        result = self.successResultOf(d)
        self.assertEqual(result, TransactionResult(
            {"a@dest.test": Reply(250, "2.0.0", "queued as X"), "b@dest.test": Reply(250, "2.0.0", "queued as X")},
            "mx.test", "",
        ))
        self.assertFalse(self.proto.busy)

    def test_without_pipelining_one_command_at_a_time(self):
        """Without PIPELINING each command waits for the previous reply."""
        self.ready(caps=("8BITMIME",))
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test")))
        self.assertEqual(self.sent(), b"MAIL FROM:<s@src.test>\r\n")
        self.server("250 ok")
        self.assertEqual(self.sent(), b"RCPT TO:<a@dest.test>\r\n")
        self.server("250 ok")
        self.assertEqual(self.sent(), b"RCPT TO:<b@dest.test>\r\n")
        self.server("250 ok")
        self.assertEqual(self.sent(), b"DATA\r\n")
        self.server("354 go")
        pump(self.transport)
        self.assertEqual(unstuff(self.sent()), MESSAGE)
        self.server("250 done")
        self.assertEqual(set(self.successResultOf(d).replies), {"a@dest.test", "b@dest.test"})

    def test_mail_parameters_when_offered(self):
        """SIZE, BODY=8BITMIME and SMTPUTF8 are sent when offered and the message needs them."""
        self.ready()
        self.proto.send(transaction(("ü@dest.test",), message=b"caf\xc3\xa9\r\n", sender="é@src.test", body_type="8BITMIME", smtputf8=True))
        first = self.sent().split(b"\r\n")[0]
        self.assertEqual(first, "MAIL FROM:<é@src.test> SIZE=7 BODY=8BITMIME SMTPUTF8".encode("utf-8"))

    def test_no_mail_parameters_when_not_offered(self):
        """Without SIZE and 8BITMIME advertised, MAIL carries no parameters (a 7-bit message marked 8BITMIME still goes)."""
        self.ready(caps=("PIPELINING",))
        self.proto.send(transaction(body_type="8BITMIME"))
        self.assertEqual(self.sent().split(b"\r\n")[0], b"MAIL FROM:<s@src.test>")

    def test_smtputf8_toward_a_server_without_it_fails_permanently(self):
        """An SMTPUTF8 message toward a server without SMTPUTF8 fails every recipient with 550 5.6.7; nothing is sent."""
        self.ready(caps=("PIPELINING", "8BITMIME"))
        result = self.successResultOf(self.proto.send(transaction(("a@dest.test", "b@dest.test"), smtputf8=True)))
        for reply in result.replies.values():
            self.assertEqual((reply.code, reply.status), (550, "5.6.7"))
            self.assertIn("SMTPUTF8", reply.text)
        self.assertEqual(len(result.replies), 2)
        self.assertEqual(self.sent(), b"")
        self.assertFalse(self.proto.busy)

    def test_8bit_message_toward_a_server_without_8bitmime_fails_permanently(self):
        """An 8-bit message toward a server without 8BITMIME fails with 554 5.6.3; nothing is sent."""
        self.ready(caps=("PIPELINING",))
        result = self.successResultOf(self.proto.send(transaction(message=b"caf\xc3\xa9\r\n", body_type="8BITMIME")))
        reply = result.replies["a@dest.test"]
        self.assertEqual((reply.code, reply.status), (554, "5.6.3"))
        self.assertIn("conversion required but not supported", reply.text)
        self.assertEqual(self.sent(), b"")

    def test_size_over_the_advertised_limit_fails_permanently(self):
        """A message larger than the peer's SIZE limit fails with 552 5.3.4 without being offered."""
        self.ready(caps=("PIPELINING", "SIZE 10"))
        reply = self.successResultOf(self.proto.send(transaction())).replies["a@dest.test"]
        self.assertEqual((reply.code, reply.status), (552, "5.3.4"))
        self.assertIsInstance(reply, LocalReply)  # relay's own decision, never the peer's words
        self.assertEqual(reply.reason, Reason.MESSAGE_TOO_BIG)
        self.assertEqual(self.sent(), b"")

    def test_source_route_in_rcpt(self):
        """A recipient with an rcpt_route is sent as <@h2,@h3:user@domain>."""
        self.ready()
        self.proto.send(transaction((("u@legacy.test", ("gw2.test", "gw3.test")),)))
        self.assertIn(b"RCPT TO:<@gw2.test,@gw3.test:u@legacy.test>\r\n", self.sent())

    def test_null_sender(self):
        """The null sender is sent as MAIL FROM:<>."""
        self.ready(caps=())
        self.proto.send(transaction(sender=""))
        self.assertEqual(self.sent(), b"MAIL FROM:<>\r\n")

    def test_mail_refused_applies_to_every_recipient(self):
        """A refused MAIL is every recipient's reply; no RCPT is sent."""
        self.ready(caps=())
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test")))
        self.sent()
        self.server("553 5.1.8 bad sender")
        result = self.successResultOf(d)
        self.assertEqual(set(result.replies.values()), {Reply(553, "5.1.8", "bad sender")})
        self.assertEqual(self.sent(), b"")

    def test_pipelined_mail_refused_with_data_354_ends_empty(self):
        """Pipelined: MAIL refused but DATA answered 354: the client ends the data with '.' alone."""
        self.ready()
        d = self.proto.send(transaction())
        self.sent()
        self.server("550 5.7.1 no", "503 5.5.1 no sender", "354 weird")
        self.assertEqual(self.sent(), b".\r\n")
        self.assertNoResult(d)
        self.server("554 5.5.1 no valid recipients")
        self.assertEqual(self.successResultOf(d).replies["a@dest.test"], Reply(550, "5.7.1", "no"))

    def test_some_recipients_refused_others_delivered(self):
        """Refused recipients keep their RCPT reply; the accepted ones get the final dot's reply."""
        self.ready()
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test", "c@dest.test")))
        self.server("250 ok", "550 5.1.1 no such user", "250 ok", "451 4.2.0 later", "354 go")
        pump(self.transport)
        self.server("250 2.0.0 queued")
        replies = self.successResultOf(d).replies
        self.assertEqual(replies, {
            "a@dest.test": Reply(550, "5.1.1", "no such user"),
            "b@dest.test": Reply(250, "2.0.0", "queued"),
            "c@dest.test": Reply(451, "4.2.0", "later"),
        })

    def test_all_recipients_refused_with_pipelined_data_354(self):
        """All RCPTs refused while DATA was pipelined and got 354: '.' alone ends it and its reply is ignored."""
        self.ready()
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test")))
        self.sent()
        self.server("250 ok", "550 5.1.1 no a", "550 5.1.1 no b", "354 go")
        self.assertEqual(self.sent(), b".\r\n")
        self.server("554 5.5.1 no valid recipients")
        replies = self.successResultOf(d).replies
        self.assertEqual(replies["a@dest.test"], Reply(550, "5.1.1", "no a"))
        self.assertEqual(replies["b@dest.test"], Reply(550, "5.1.1", "no b"))

    def test_all_recipients_refused_with_pipelined_data_503(self):
        """All RCPTs refused and DATA answered 503: the transaction ends at once with the RCPT replies."""
        self.ready()
        d = self.proto.send(transaction())
        self.sent()
        self.server("250 ok", "550 5.1.1 no", "503 5.5.1 no valid recipients")
        self.assertEqual(self.successResultOf(d).replies["a@dest.test"], Reply(550, "5.1.1", "no"))
        self.assertEqual(self.sent(), b"")

    def test_all_recipients_refused_without_pipelining_sends_no_data(self):
        """Without PIPELINING, DATA is sent only when a recipient was accepted."""
        self.ready(caps=())
        d = self.proto.send(transaction())
        self.server("250 ok")
        self.sent()
        self.server("550 5.1.1 no")
        self.assertEqual(self.sent(), b"")
        self.assertEqual(self.successResultOf(d).replies["a@dest.test"].code, 550)

    def test_data_refused(self):
        """A 554 to DATA is the reply of every accepted recipient."""
        self.ready()
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test")))
        self.server("250 ok", "250 ok", "550 5.1.1 no b", "554 5.3.0 no data today")
        replies = self.successResultOf(d).replies
        self.assertEqual(replies["a@dest.test"], Reply(554, "5.3.0", "no data today"))
        self.assertEqual(replies["b@dest.test"], Reply(550, "5.1.1", "no b"))

    def test_final_dot_replies(self):
        """The reply to the final dot (250, 451 or 550) is every accepted recipient's reply."""
        for line, expected in [("250 2.0.0 ok", Reply(250, "2.0.0", "ok")),
                               ("451 4.3.0 try later", Reply(451, "4.3.0", "try later")),
                               ("550 5.7.1 spam", Reply(550, "5.7.1", "spam"))]:
            self.ready()
            d = self.proto.send(transaction())
            self.server("250 ok", "250 ok", "354 go")
            pump(self.transport)
            self.server(line)
            self.assertEqual(self.successResultOf(d).replies, {"a@dest.test": expected})

    def test_421_in_a_transaction_ends_it_and_the_connection(self):
        """A 421 mid-transaction is the reply of every undecided recipient and closes the connection."""
        self.ready(caps=())
        d = self.proto.send(transaction(("a@dest.test", "b@dest.test", "c@dest.test")))
        self.server("250 ok", "550 5.1.1 no a", "421 4.3.2 shutting down")
        replies = self.successResultOf(d).replies
        self.assertEqual(replies["a@dest.test"].code, 550)
        self.assertEqual(replies["b@dest.test"].code, 421)
        self.assertEqual(replies["c@dest.test"].code, 421)
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.transport.disconnecting)

    def test_reuse_sends_rset_first(self):
        """A second transaction on the same connection starts with RSET (pipelined with the rest)."""
        self.ready()
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok", "354 go")
        pump(self.transport)
        self.server("250 ok")
        self.successResultOf(d)
        self.sent()
        d = self.proto.send(transaction(("z@dest.test",)))
        self.assertEqual(len(self.transport.writes), 1)
        self.assertTrue(self.sent().startswith(b"RSET\r\nMAIL FROM:<s@src.test>"))
        self.server("250 ok", "250 ok", "250 ok", "354 go")
        pump(self.transport)
        self.server("250 second")
        self.assertEqual(self.successResultOf(d).replies["z@dest.test"].text, "second")

    def test_reuse_without_pipelining_waits_for_rset(self):
        """Without PIPELINING, RSET is answered before MAIL is sent."""
        self.ready(caps=())
        d = self.proto.send(transaction())
        self.server("550 no")
        self.successResultOf(d)
        self.sent()
        self.proto.send(transaction())
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server("250 ok")
        self.assertEqual(self.sent(), b"MAIL FROM:<s@src.test>\r\n")

    def test_rset_refused_fails_the_transaction(self):
        """A refused RSET fails the transaction transiently and drops the connection."""
        self.ready(caps=())
        d = self.proto.send(transaction())
        self.server("550 no")
        self.successResultOf(d)
        d = self.proto.send(transaction())
        self.server("500 what")
        self.assertTrue(self.session_error(d).transient)
        self.assertTrue(self.proto.closed)

    def test_quit(self):
        """quit() sends QUIT, fires on the reply and closes the connection."""
        self.ready()
        d = self.proto.quit()
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.assertTrue(self.proto.closed)
        self.assertNoResult(d)
        self.server("221 2.0.0 bye")
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.transport.disconnecting)

    def test_send_on_a_closed_connection_fails(self):
        """send() after quit() errbacks with a transient SessionError."""
        self.ready()
        self.proto.quit()
        self.assertTrue(self.session_error(self.proto.send(transaction())).transient)

    def test_connection_lost_mid_data(self):
        """A connection lost while the message streams errbacks send with stage lost and stops reading the file."""
        self.ready()
        source = io.BytesIO(MESSAGE * 100)
        t = Transaction("s@src.test", (("a@dest.test", ()),), len(source.getvalue()), open_message=lambda: source)
        self.proto.chunk_size = 16
        d = self.proto.send(t)
        self.server("250 ok", "250 ok", "354 go")
        self.transport.producer.resumeProducing()
        self.proto.connectionLost(None)
        err = self.session_error(d)
        self.assertEqual((err.transient, err.stage), (True, "lost"))
        self.assertTrue(source.closed)
        self.assertTrue(self.proto.closed)

    def test_read_error_mid_data_never_sends_the_dot(self):
        """A disk read error while streaming drops the connection without the end-of-data mark."""
        class Failing(io.BytesIO):
            def read(self, n=-1):
                raise OSError("disk on fire")
        self.ready()
        t = Transaction("s@src.test", (("a@dest.test", ()),), 10, open_message=Failing)
        d = self.proto.send(t)
        self.server("250 ok", "250 ok", "354 go")
        self.sent()
        pump(self.transport)
        self.assertEqual(self.sent(), b"")
        self.assertEqual(self.session_error(d).stage, "lost")
        self.assertTrue(self.transport.disconnecting)

    def test_bare_line_endings_become_crlf(self):
        """Bare LF and bare CR in the stored message go out as CRLF, and a '.' after them is stuffed."""
        self.ready()
        self.proto.send(transaction(message=b"a\n.b\rc\r\n"))
        self.server("250 ok", "250 ok", "354 go")
        self.sent()
        pump(self.transport)
        self.assertEqual(self.sent(), b"a\r\n..b\r\nc\r\n.\r\n")

    def test_missing_final_crlf_is_added(self):
        """A message not ending in CRLF gets one before the end-of-data mark."""
        self.ready()
        self.proto.send(transaction(message=b"no newline"))
        self.server("250 ok", "250 ok", "354 go")
        self.sent()
        pump(self.transport)
        self.assertEqual(self.sent(), b"no newline\r\n.\r\n")


class NulTests(ClientTestCase):
    def test_message_in_memory_with_nul_is_never_sent(self):
        """A queued message holding a NUL gets 554 5.6.0 from relay itself; not even MAIL is sent."""
        self.ready(caps=("PIPELINING",))
        result = self.successResultOf(self.proto.send(transaction(message=b"Subject: x\r\n\r\na\0.\r\n", crlf_only=True)))
        reply = result.replies["a@dest.test"]
        self.assertEqual((reply.code, reply.status), (554, "5.6.0"))
        self.assertIsInstance(reply, LocalReply)
        self.assertEqual(self.sent(), b"")

    def test_streamed_message_with_nul_ends_the_session_before_the_end_of_data(self):
        """A NUL found while streaming a large message drops the connection without the final dot."""
        class FileLike(io.RawIOBase):
            def __init__(self, data):
                self._data = io.BytesIO(data)

            def readable(self):
                return True

            def read(self, n=-1):
                return self._data.read(n)

        body = b"Subject: x\r\n\r\n" + b"line\r\n" * 20000 + b"a\0.\r\n"
        t = Transaction("s@src.test", (("a@dest.test", ()),), len(body), open_message=lambda: FileLike(body), queue_id="Q1")
        self.ready(caps=("PIPELINING",))
        d = self.proto.send(t)
        self.server("250 ok", "250 ok", "354 go")
        pump(self.transport)
        error = self.failureResultOf(d, SessionError).value
        self.assertFalse(error.transient)
        self.assertEqual((error.reply.code, error.reply.status), (554, "5.6.0"))
        self.assertNotIn(b"\r\n.\r\n", self.sent())
        self.assertTrue(self.transport.disconnecting)


class TimeoutTests(ClientTestCase):
    def assert_timeout(self, d, seconds: float) -> None:
        self.clock.advance(seconds - 0.5)
        self.assertNoResult(d)
        self.clock.advance(1)
        err = self.session_error(d)
        self.assertEqual((err.transient, err.stage), (True, "timeout"))
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.proto.closed)

    def test_greeting_timeout(self):
        """No greeting within the greeting timeout fails ready with stage timeout."""
        self.connect()
        self.assert_timeout(self.proto.ready, TIMEOUTS.greeting)

    def test_ehlo_timeout(self):
        """No EHLO reply within the EHLO timeout fails ready with stage timeout."""
        self.connect()
        self.server("220 mx.test")
        self.assert_timeout(self.proto.ready, TIMEOUTS.ehlo)

    def test_mail_timeout(self):
        """No MAIL reply within the MAIL timeout fails the transaction."""
        self.ready()
        self.assert_timeout(self.proto.send(transaction()), TIMEOUTS.mail)

    def test_rcpt_timeout(self):
        """After the MAIL reply, the RCPT timeout applies."""
        self.ready()
        d = self.proto.send(transaction())
        self.server("250 ok")
        self.assert_timeout(d, TIMEOUTS.rcpt)

    def test_data_init_timeout(self):
        """After the RCPT replies, the DATA timeout applies."""
        self.ready()
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok")
        self.assert_timeout(d, TIMEOUTS.data_init)

    def test_data_block_timeout(self):
        """A peer that stops reading the data for the data block timeout fails the transaction."""
        self.ready()
        self.proto.chunk_size = 4
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok", "354 go")
        self.transport.producer.resumeProducing()
        self.clock.advance(TIMEOUTS.data_block - 1)
        self.transport.producer.resumeProducing()  # progress restarts the timer
        self.assert_timeout(d, TIMEOUTS.data_block)

    def test_final_dot_timeout(self):
        """No reply to the end of data within the final dot timeout fails the transaction."""
        self.ready()
        d = self.proto.send(transaction())
        self.server("250 ok", "250 ok", "354 go")
        pump(self.transport)
        self.assert_timeout(d, TIMEOUTS.final_dot)

    def test_idle_connection_is_closed(self):
        """A ready connection unused for the idle time is closed with QUIT."""
        self.ready()
        self.clock.advance(TIMEOUTS.idle + 1)
        self.assertTrue(self.proto.closed)
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_send_cancels_the_idle_timer(self):
        """A transaction in progress is not closed by the idle timer."""
        self.ready()
        d = self.proto.send(transaction())
        self.clock.advance(TIMEOUTS.mail - 1)
        self.server("250 ok")
        self.clock.advance(TIMEOUTS.rcpt - 1)
        self.server("250 ok", "354 go")
        pump(self.transport)
        self.clock.advance(TIMEOUTS.final_dot - 1)
        self.assertGreater(self.clock.seconds(), TIMEOUTS.idle)
        self.server("250 ok")
        self.successResultOf(d)
        self.assertFalse(self.proto.closed)

    def test_no_pending_calls_after_quit(self):
        """After QUIT is answered no timer is left on the clock."""
        self.ready()
        self.proto.quit()
        self.server("221 bye")
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- dot-stuffing across chunk boundaries (property-based) ----------------------

_lines = st.lists(
    st.one_of(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
        st.sampled_from([b".", b"..", b".x", b"", b". ", b"...."]),
    ),
    max_size=30,
)


class DotStuffingTests(ClientTestCase):
    @settings(max_examples=200, deadline=None)
    @given(lines=_lines, chunk_size=st.integers(min_value=1, max_value=50), final_crlf=st.booleans())
    def test_dot_stuffing_survives_any_chunking(self, lines, chunk_size, final_crlf):
        """For any message and chunk size, the wire unstuffed the RFC way is the message (plus a final CRLF), with no early '.' line."""
        message = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
        self.ready()
        self.proto.chunk_size = chunk_size
        d = self.proto.send(transaction(message=message))
        self.server("250 ok", "250 ok", "354 go")
        self.sent()
        pump(self.transport)
        wire = self.sent()
        expected = message if (not message or message.endswith(b"\r\n")) else message + b"\r\n"
        self.assertEqual(unstuff(wire), expected)
        self.server("250 ok")
        self.successResultOf(d)

    @given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=10))
    def test_stuffer_is_independent_of_chunk_boundaries(self, data, cuts):
        """DotStuffer gives the same bytes however the input is cut."""
        whole = DotStuffer()
        expected = whole.feed(data) + whole.finish()
        pieces = DotStuffer()
        out, start = b"", 0
        for cut in sorted(cuts) + [len(data)]:
            out += pieces.feed(data[start:cut])
            start = max(start, cut)
        out += pieces.finish()
        self.assertEqual(out, expected)
        self.assertNotIn(b"\r\n.\r\n", out[:-3])


# -- integration: the real reactor against aiosmtpd on loopback -------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import io, json, os, sys
    from dataclasses import replace
    from twisted.internet import reactor, defer
    from relay.smtp.connect import connect
    from relay.smtp.transaction import ClientOptions, ClientTimeouts, Transaction, SessionError

    port, tls, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out = {}

    @defer.inlineCallbacks
    def main():
        try:
            options = ClientOptions("client.test", tls=tls, ca_file=os.environ.get("CA_FILE", ""), timeouts=ClientTimeouts(connect=5, greeting=10, ehlo=10, mail=10, rcpt=10, data_init=10, data_block=10, final_dot=10))
            proto = yield connect(reactor, "127.0.0.1", port, "sink.test", options)
            out["capabilities"] = sorted(proto.capabilities)
            out["results"] = []
            for i, path in enumerate(paths):
                size = len(open(path, "rb").read())
                t = Transaction("from@src.test", (("to%d@dest.test" % i, ()), ("bad@dest.test", ())), size,
                                body_type="8BITMIME", open_message=lambda p=path: open(p, "rb"), queue_id="Q%d" % i)
                result = yield proto.send(t)
                out["results"].append({"tls": result.tls, "replies": {k: [v.code, v.status, v.text] for k, v in result.replies.items()}})
            yield proto.quit()
            if tls == "verify":
                try:
                    yield connect(reactor, "127.0.0.1", port, "sink.test", replace(options, tls_hostname="other.test"))
                except SessionError as e:
                    out["mismatch"] = [e.stage, e.transient]
            try:
                yield connect(reactor, "127.0.0.1", 1, "nowhere.test", options)
            except SessionError as e:
                out["refused"] = [e.stage, e.transient, e.reason.value]
        except Exception as e:
            out["error"] = repr(e)
        reactor.stop()

    reactor.callWhenRunning(main)
    reactor.callLater(60, reactor.stop)
    reactor.run()
    print(json.dumps(out))
    """
)


def _make_tls_context(tmp_path: Path):
    """A server SSLContext with a fresh self-signed certificate."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sink.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("sink.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def _boundary_message() -> bytes:
    """A message with '.' lines at 64 KiB chunk boundaries (at, before and across a CRLF), 8-bit bytes and long lines."""
    out = bytearray(b"Subject: boundaries\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    long_line = ("caf\u00e9 " * 110).encode("utf-8")[:996] + b"\r\n"
    for k, shift in ((1, 0), (2, -1), (3, 1)):
        dot_at = k * 64 * 1024 + shift  # where the '.' of a lone '.' line falls
        while dot_at - len(out) > len(long_line) + 3:
            out += long_line
        out += b"y" * (dot_at - len(out) - 2) + b"\r\n"
        assert len(out) == dot_at
        out += b".\r\n..dots\r\n"
    out += b"\xff\xfe raw 8-bit\r\n.\r\nlast line"
    return bytes(out)


@pytest.mark.parametrize("tls", ["verify", "require", "may"])
def test_delivers_exact_bytes_to_aiosmtpd(tmp_path, tls):
    """Under the real reactor over loopback, aiosmtpd (with STARTTLS, or in clear) receives exactly the original bytes, per-recipient replies come back, and a refused connection is a connect error."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    received: list[tuple[str, list[str], bytes, list[str]]] = []

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("bad@"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"

        async def handle_DATA(self, server, session, envelope):
            received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, list(envelope.mail_options)))
            return "250 2.0.0 queued"

    class LongLineSMTP(SMTP):
        line_length_limit = 100000

    class LongLineController(Controller):
        def factory(self):
            return LongLineSMTP(self.handler, **self.SMTP_kwargs)

    sys.path.insert(0, str(REPO / "tests"))
    from relayproc import free_port

    port = free_port()
    controller = LongLineController(
        Handler(), hostname="127.0.0.1", port=port, server_hostname="sink.test", ready_timeout=10,
        decode_data=False, enable_SMTPUTF8=True,
        **({"tls_context": _make_tls_context(tmp_path), "require_starttls": True} if tls != "may" else {}),
    )
    messages = [_boundary_message(), b"Subject: short\r\n\r\n.\r\n..\r\nend\r\n", b"x" * 70000]
    paths = []
    for i, m in enumerate(messages):
        p = tmp_path / f"m{i}.eml"
        p.write_bytes(m)
        paths.append(str(p))
    controller.start()
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "CA_FILE": str(tmp_path / "cert.pem")}
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, str(port), tls, *paths],
            capture_output=True, timeout=60, env=env, cwd=str(tmp_path),
        )
    finally:
        controller.stop()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert "error" not in out, out
    assert len(out["results"]) == len(messages), out
    assert "STARTTLS" not in out["capabilities"]  # the EHLO after TLS no longer offers it
    assert len(received) == len(messages), out
    for i, (message, got, result) in enumerate(zip(messages, received, out["results"])):
        sender, rcpts, data, mail_options = got
        expected = message if message.endswith(b"\r\n") else message + b"\r\n"
        assert data == expected, f"message {i} differs"
        assert (sender, rcpts) == ("from@src.test", [f"to{i}@dest.test"])
        assert "BODY=8BITMIME" in mail_options
        assert result["tls"].startswith("TLSv1.") if tls != "may" else result["tls"] == ""
        assert result["replies"][f"to{i}@dest.test"] == [250, "2.0.0", "queued"]
        assert result["replies"]["bad@dest.test"] == [550, "5.1.1", "no such user"]
    assert out["refused"] == ["connect", True, "connect-refused"]  # typed from Twisted's exception
    if tls == "verify":
        assert out["mismatch"] == ["starttls", True]  # a certificate for another name is refused


def test_queued_message_in_memory_goes_out_in_one_write_with_its_dot():
    """A queued (crlf_only) message held in memory is sent dot-stuffed with its end-of-data in one write."""
    writes: list[bytes] = []

    class Recording(StringTransport):
        def write(self, data: bytes) -> None:
            writes.append(data)
            super().write(data)

    transport = Recording()
    done: list[bool] = []
    message = b"Subject: x\r\n\r\n.dot\r\n" + b"y" * 200_000 + b"\r\n"
    producer = MessageProducer(io.BytesIO(message), transport, progress=lambda: None, done=lambda: done.append(True),
                               failed=lambda e: None, crlf_only=True, whole=True)
    producer.start()
    assert writes == [b"Subject: x\r\n\r\n..dot\r\n" + b"y" * 200_000 + b"\r\n.\r\n"]
    assert done == [True] and transport.producer is None
