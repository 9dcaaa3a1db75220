"""Tests for relay.bounce and relay.dsn_report: RFC 3464 delivery status notifications, built and spooled."""

from __future__ import annotations

import email
import email.policy
import io
import re
import os
import shutil
import sqlite3
import tempfile
from dataclasses import replace
from email.message import EmailMessage, Message
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relay import bounce, dsn_report
from relay.bounce import MAX_HEADER_OCTETS, READ_CHUNK, read_header_section, send_dsn
from relay.dsn_report import build_dsn, recipient_status
from relay.envelope import (
    FAILED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    PENDING,
    Attempt,
    ClientInfo,
    Envelope,
    Recipient,
)
from relay.outcome import (
    LocalReply,
    Reason,
    reply_outcome,
    resolution_outcome,
    unreachable,
    unreachable_outcome,
)
from relay.queue.rules import apply_outcome
from relay.queue.store import Spool
from relay.smtp.transaction import REPLY_NO_SMTPUTF8, TEXT_TOO_BIG, SessionError
from relay.smtp.replies import Reply

HOST = "relay.example.org"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 3600

ORIGINAL_HEADERS = (
    b"Received: from app.example.org ([192.0.2.10])\r\n"
    b"\tby relay.example.org (relay) with ESMTP id Q1; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, carol@example.com\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <report-1@example.org>\r\n"
)
SECRET_BODY = b"the secret body text that must never be returned\r\n"
ORIGINAL = ORIGINAL_HEADERS + b"\r\n" + SECRET_BODY


def sync_runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run the spool's disk work at once, on the calling thread."""
    return defer.maybeDeferred(f, *args)


def bob_rejected() -> Recipient:
    return Recipient(
        address="bob@example.net",
        status=FAILED,
        attempts=1,
        last_error="550 5.1.1 <bob@example.net>: no such user",
        history=(
            Attempt(
                time=ARRIVAL + 60,
                outcome=OUTCOME_PERMANENT,
                code=550,
                status="5.1.1",
                text="<bob@example.net>: no such user",
                host="mx1.example.net[192.0.2.25]",
                remote=True,
                rule="mx",
            ),
        ),
    )


def carol_no_domain() -> Recipient:
    return Recipient(
        address="carol@example.com",
        status=FAILED,
        attempts=1,
        last_error="5.1.2 DNS: example.com does not exist",
        history=(Attempt(time=ARRIVAL + 61, outcome=OUTCOME_PERMANENT, status="5.1.2",
                         text="DNS: example.com does not exist", reason="dns"),),
    )


def dave_still_busy(status: str = PENDING) -> Recipient:
    return Recipient(
        address="dave@example.net",
        status=status,
        attempts=5,
        last_error="451 4.3.0 mailbox busy, try later",
        history=(
            Attempt(time=ARRIVAL + 100, outcome=OUTCOME_TRANSIENT, code=451, status="4.3.0",
                    text="mailbox busy, try later", host="mx2.example.net[192.0.2.26]", remote=True),
        ),
    )


def original_envelope(sender: str = "alice@example.org", **changes: Any) -> Envelope:
    values: dict[str, Any] = dict(
        queue_id="Q1",
        sender=sender,
        recipients=(bob_rejected(), carol_no_domain()),
        client=ClientInfo(address="192.0.2.10", helo="app.example.org"),
        arrival=ARRIVAL,
    )
    values.update(changes)
    return Envelope(**values)


def parse(message: bytes) -> EmailMessage:
    return email.message_from_bytes(message, policy=email.policy.default)  # type: ignore[return-value]


def status_groups(part: Message) -> list[Message]:
    """The per-message group and the per-recipient groups of a message/delivery-status part."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    return payload


def raw_groups(message: bytes, content_type: bytes) -> list[dict[str, str]]:
    """The field groups of the part of ``content_type``, parsed from the raw bytes."""
    start = message.index(b"Content-Type: " + content_type)
    body = message[message.index(b"\r\n\r\n", start) + 4:]
    body = body[: body.index(b"\r\n--")].decode("utf-8")
    groups = []
    for block in body.split("\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in re.sub(r"\r\n[ \t]", " ", block).split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        groups.append(fields)
    return groups


class BuildDsnTests(SynchronousTestCase):
    """The notification's structure and fields, parsed back with the email package."""

    def dsn(self, **kwargs: Any) -> bytes:
        envelope = kwargs.pop("envelope", original_envelope())
        recipients = kwargs.pop("recipients", list(envelope.recipients))
        headers = kwargs.pop("headers", ORIGINAL_HEADERS)
        return build_dsn(envelope, recipients, headers, HOST, NOW, **kwargs)

    def test_multipart_report_with_three_parts(self) -> None:
        """The notification is a multipart/report of report-type delivery-status with text, status and headers parts."""
        message = parse(self.dsn())
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertEqual(message.defects, [])

    def test_top_level_headers(self) -> None:
        """From is the mailer daemon, To the sender, with the failure subject, a date, an id and Auto-Submitted."""
        message = parse(self.dsn(message_id="<dsn-1@relay.example.org>"))
        self.assertEqual(message["From"].addresses[0].display_name, "Mail Delivery System")
        self.assertEqual(message["From"].addresses[0].addr_spec, "MAILER-DAEMON@relay.example.org")
        self.assertEqual(message["To"].addresses[0].addr_spec, "alice@example.org")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message["Message-ID"], "<dsn-1@relay.example.org>")
        self.assertEqual(message["Date"].datetime.timestamp(), NOW)

    def test_generated_message_ids_are_unique(self) -> None:
        """Without a given id, each notification gets its own Message-ID at the relay's host name."""
        first, second = parse(self.dsn())["Message-ID"], parse(self.dsn())["Message-ID"]
        self.assertNotEqual(first, second)
        self.assertTrue(first.endswith("@relay.example.org>"))

    def test_per_message_fields(self) -> None:
        """The status part starts with Reporting-MTA, the queue id and the RFC 5322 arrival date."""
        groups = status_groups(parse(self.dsn()).get_payload()[1])
        first = groups[0]
        self.assertEqual(first["Reporting-MTA"], "dns; relay.example.org")
        self.assertEqual(first["X-Relay-Queue-ID"], "Q1")
        self.assertEqual(first["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertNotIn("Original-Envelope-Id", first)

    def test_per_recipient_fields_for_several_recipients(self) -> None:
        """Each failed recipient has its own group with address, action, status, remote MTA and diagnostic."""
        groups = status_groups(parse(self.dsn()).get_payload()[1])
        self.assertEqual(len(groups), 3)
        bob, carol = groups[1], groups[2]
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.net")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx1.example.net")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 <bob@example.net>: no such user")
        self.assertEqual(bob["Last-Attempt-Date"], "Tue, 14 Nov 2023 22:14:20 +0000")
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.com")
        self.assertEqual(carol["Action"], "failed")
        self.assertEqual(carol["Status"], "5.1.2")
        self.assertNotIn("Remote-MTA", carol)
        self.assertEqual(carol["Diagnostic-Code"], "X-Relay; 5.1.2 DNS: example.com does not exist")

    def test_human_readable_part_names_recipients_and_replies(self) -> None:
        """The text part names the host, the queue id and each recipient with the remote reply."""
        text = parse(self.dsn()).get_payload()[0].get_content()
        self.assertIn("This is the mail system at host relay.example.org.", text)
        self.assertIn("Q1", text)
        self.assertIn(
            "<bob@example.net>: host mx1.example.net[192.0.2.25] said: 550 5.1.1 <bob@example.net>: no such user",
            text,
        )
        self.assertIn("<carol@example.com>: 5.1.2 DNS: example.com does not exist", text)

    def test_original_headers_returned_without_body(self) -> None:
        """The third part holds the original header section and nothing of the body, even when given a whole message."""
        for headers in (ORIGINAL_HEADERS, ORIGINAL):
            raw = self.dsn(headers=headers)
            part = parse(raw).get_payload()[2]
            content = part.get_content()
            self.assertIn("Subject: quarterly report", content)
            self.assertIn("Message-ID: <report-1@example.org>", content)
            self.assertNotIn(b"secret body", raw)

    def test_delayed_notification(self) -> None:
        """A delay warning has its own subject, Action delayed, the 4.x.x status and Will-Retry-Until."""
        envelope = original_envelope(recipients=(dave_still_busy(),))
        until = ARRIVAL + 5 * 86400
        message = parse(self.dsn(envelope=envelope, action="delayed", retry_until=until))
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        groups = status_groups(message.get_payload()[1])
        dave = groups[1]
        self.assertEqual(dave["Action"], "delayed")
        self.assertEqual(dave["Status"], "4.3.0")
        self.assertEqual(dave["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")
        self.assertEqual(dave["Diagnostic-Code"], "smtp; 451 4.3.0 mailbox busy, try later")
        text = message.get_payload()[0].get_content()
        self.assertIn("THIS IS A WARNING ONLY", text)
        self.assertIn("Sun, 19 Nov 2023 22:13:20 +0000", text)

    def test_delayed_without_enhanced_code_is_4_0_0(self) -> None:
        """A delayed recipient whose reply carries no enhanced code gets Status 4.0.0."""
        recipient = Recipient(address="x@example.net", last_error="421 try again")
        self.assertEqual(recipient_status(recipient, "delayed"), "4.0.0")

    def test_expiry_is_4_4_7(self) -> None:
        """A recipient that failed only temporarily until the lifetime ended is reported failed with 4.4.7."""
        envelope = original_envelope(recipients=(dave_still_busy(FAILED),))
        message = parse(self.dsn(envelope=envelope))
        dave = status_groups(message.get_payload()[1])[1]
        self.assertEqual(dave["Action"], "failed")
        self.assertEqual(dave["Status"], "4.4.7")
        self.assertEqual(dave["Diagnostic-Code"], "smtp; 451 4.3.0 mailbox busy, try later")
        self.assertIn("delivery time expired", message.get_payload()[0].get_content())

    def test_status_defaults(self) -> None:
        """A permanent failure without an enhanced code is 5.0.0; a transient one at the end is 4.4.7."""
        permanent = Recipient(address="x@example.net", last_error="550 go away",
                              history=(Attempt(time=1.0, outcome=OUTCOME_PERMANENT, code=550, text="go away",
                                                host="mx[192.0.2.1]", remote=True),))
        transient = Recipient(address="x@example.net", last_error="Connection refused",
                              history=(Attempt(time=1.0, outcome=OUTCOME_TRANSIENT, status="4.4.1",
                                                text="Connection refused", reason="connect-refused"),))
        self.assertEqual(recipient_status(permanent), "5.0.0")
        self.assertEqual(recipient_status(transient), "4.4.7")
        self.assertEqual(recipient_status(Recipient(address="x@example.net")), "5.0.0")


    def test_envid_and_orcpt(self) -> None:
        """ENVID becomes Original-Envelope-Id and ORCPT becomes Original-Recipient, xtext decoded."""
        bob = Recipient(address="bob@example.net", params=(("ORCPT", "rfc822;Bob+2BList@example.net"),),
                        last_error="550 5.1.1 no such user")
        envelope = original_envelope(recipients=(bob,), mail_params=(("ENVID", "abc+2B123"),))
        groups = status_groups(parse(self.dsn(envelope=envelope)).get_payload()[1])
        self.assertEqual(groups[0]["Original-Envelope-Id"], "abc+123")
        self.assertEqual(groups[1]["Original-Recipient"], "rfc822; Bob+List@example.net")

    def test_non_ascii_sender_gets_a_utf8_notification(self) -> None:
        """A non-ASCII sender gets raw UTF-8 with the RFC 6533 global status and headers types."""
        envelope = original_envelope(
            sender="jörg@bücher.example",
            recipients=(Recipient(address="zoë@example.net", status=FAILED, last_error="550 5.1.1 unknown"),),
        )
        headers = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n".encode("utf-8")
        raw = self.dsn(envelope=envelope, headers=headers)
        message = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
        self.assertEqual(message["To"].addresses[0].addr_spec, "jörg@bücher.example")
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/global-delivery-status", "message/global-headers"],
        )
        groups = raw_groups(raw, b"message/global-delivery-status")
        self.assertEqual(groups[1]["Final-Recipient"], "utf-8; zoë@example.net")
        self.assertEqual(groups[0]["X-Relay-Sender"], "utf-8; jörg@bücher.example")
        self.assertIn("Subject: Grüße".encode("utf-8"), raw)
        text = parse(raw).get_payload()[0].get_payload(decode=True).decode("utf-8")
        self.assertIn("<zoë@example.net>: 550 5.1.1 unknown", text)

    def test_ascii_sender_notification_stays_7bit(self) -> None:
        """For an ASCII sender, non-ASCII recipients become utf-8-addr-xtext and 8-bit headers quoted-printable."""
        envelope = original_envelope(
            recipients=(Recipient(address="zoë@example.net", status=FAILED, last_error="550 5.1.1 unknown"),),
        )
        headers = "From: Jörg <alice@example.org>\r\nSubject: Grüße\r\n".encode("utf-8")
        raw = self.dsn(envelope=envelope, headers=headers)
        self.assertTrue(raw.isascii())
        message = parse(raw)
        groups = status_groups(message.get_payload()[1])
        self.assertEqual(groups[1]["Final-Recipient"], "utf-8; zo\\x{EB}@example.net")
        part = message.get_payload()[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(part.get_payload(decode=True), headers)
        self.assertIn("<zoë@example.net>", message.get_payload()[0].get_content())

    def test_crlf_lines_within_998_octets(self) -> None:
        """Every line ends in CRLF and none exceeds 998 octets, even for huge replies and header lines."""
        long_text = "policy " * 400 + "x" * 2000
        attempt = Attempt(time=NOW, outcome=OUTCOME_PERMANENT, code=550, status="5.7.1", text=long_text,
                          host="mx1.example.net[192.0.2.25]", remote=True)
        bob = Recipient(address="bob@example.net", status=FAILED, last_error=attempt.reply, history=(attempt,))
        headers = b"Subject: " + b"y" * 3000 + b"\r\nX-Bare: lf\nX-Next: ok\r\n"
        raw = build_dsn(original_envelope(recipients=(bob,)), [bob], headers, HOST, NOW)
        self.assertNotRegex(raw, rb"[^\r]\n")
        self.assertNotRegex(raw, rb"\r[^\n]")
        self.assertTrue(raw.endswith(b"\r\n"))
        self.assertLessEqual(max(len(line) for line in raw.split(b"\r\n")), 998)
        bob_group = status_groups(parse(raw).get_payload()[1])[1]
        self.assertEqual(bob_group["Status"], "5.7.1")
        self.assertIn("X-Next: ok", parse(raw).get_payload()[2].get_content())

    def test_unknown_action_refused(self) -> None:
        """An action other than failed, delayed or relayed is a programming error, not a notification."""
        self.assertRaises(ValueError, self.dsn, action="delivered")


MX = "mx.pf.test[192.0.2.40]"


def after(outcome: Any, status: str = FAILED) -> Recipient:
    """The recipient as the scheduler stores it after ``outcome`` (FAILED for a bounce, else PENDING)."""
    recipient = apply_outcome(Recipient(address=outcome.recipient), outcome, ARRIVAL + 60)
    return replace(recipient, status=status)


class WhoseWordsTests(SynchronousTestCase):
    """DSNs read each attempt's facts: "host X said" and smtp diagnostics only for what a remote host sent."""

    def fields(self, recipient: Recipient, action: str = "failed") -> tuple[dict, str]:
        envelope = original_envelope(recipients=(recipient,))
        message = parse(build_dsn(envelope, [recipient], ORIGINAL_HEADERS, HOST, NOW, action=action,
                                  retry_until=NOW + 86400 if action == "delayed" else None))
        return status_groups(message.get_payload()[1])[1], message.get_payload()[0].get_content()

    def assert_local(self, group: Message, text: str, words: str) -> None:
        self.assertEqual(group["Diagnostic-Code"], f"X-Relay; {words}")
        self.assertNotIn("Remote-MTA", group)
        self.assertNotIn("said", text)
        self.assertIn(words, text)

    def test_a_size_refusal_before_mail_is_relays_own_decision(self) -> None:
        """552 5.3.4 for a message over the peer's SIZE is never "host said" nor an smtp diagnostic."""
        refusal = LocalReply(552, "5.3.4", TEXT_TOO_BIG.format(size=20480, limit=10240), Reason.MESSAGE_TOO_BIG)
        group, text = self.fields(after(reply_outcome("bob@example.net", refusal, MX, "mx")))
        self.assertEqual(group["Status"], "5.3.4")
        self.assert_local(group, text, "5.3.4 message size 20480 exceeds the remote server's limit of 10240 octets")

    def test_an_smtputf8_downgrade_refusal_is_relays_own_decision(self) -> None:
        """5.6.7 (the next hop has no SMTPUTF8) is reported as relay's words."""
        group, text = self.fields(after(reply_outcome("bob@example.net", REPLY_NO_SMTPUTF8, MX, "mx")))
        self.assertEqual(group["Status"], "5.6.7")
        self.assert_local(group, text, "5.6.7 remote server does not support SMTPUTF8")

    def test_a_dns_failure_is_relays_own_decision(self) -> None:
        """NXDOMAIN is reported with its status and relay's words."""
        outcome = resolution_outcome("bob@example.net", "5.1.2", "domain example.net does not exist", "mx")
        group, text = self.fields(after(outcome))
        self.assertEqual(group["Status"], "5.1.2")
        self.assert_local(group, text, "5.1.2 DNS: domain example.net does not exist")

    def test_a_refused_connection_until_expiry_is_relays_own_decision(self) -> None:
        """Connection refused to the end: 4.4.7, relay's words naming the host, no Remote-MTA."""
        error = SessionError(None, True, "connect", "cannot connect", Reason.CONNECT_REFUSED)
        outcome = unreachable_outcome("bob@example.net", unreachable(f"{MX}:25", MX, Failure(error)), "mx")
        group, text = self.fields(after(outcome))
        self.assertEqual(group["Status"], "4.4.7")
        self.assert_local(group, text, f"4.4.1 connect to {MX}:25: Connection refused")
        self.assertIn("delivery time expired", text)

    def test_a_refused_connection_in_a_delay_warning(self) -> None:
        """A delay warning for a refused connection carries 4.4.1 and an X-Relay diagnostic."""
        error = SessionError(None, True, "connect", "cannot connect", Reason.CONNECT_REFUSED)
        outcome = unreachable_outcome("bob@example.net", unreachable(f"{MX}:25", MX, Failure(error)), "mx")
        group, text = self.fields(after(outcome, PENDING), action="delayed")
        self.assertEqual(group["Status"], "4.4.1")
        self.assert_local(group, text, f"4.4.1 connect to {MX}:25: Connection refused")

    def test_a_remote_refusal_is_what_the_host_said(self) -> None:
        """550 5.1.1 sent by the peer: "host X said", Remote-MTA and an smtp diagnostic."""
        outcome = reply_outcome("bob@example.net", Reply(550, "5.1.1", "no such user"), MX, "mx")
        group, text = self.fields(after(outcome))
        self.assertEqual((group["Status"], group["Remote-MTA"]), ("5.1.1", "dns; mx.pf.test"))
        self.assertEqual(group["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertIn(f"host {MX} said: 550 5.1.1 no such user", text)

    def test_a_greeting_refused_until_expiry_is_what_the_host_said(self) -> None:
        """A 421 greeting to the end: 4.4.7, and the peer's own words with its host."""
        busy = SessionError(Reply(421, "4.7.0", "too many connections"), True, "greeting")
        outcome = unreachable_outcome("bob@example.net", unreachable(f"{MX}:25", MX, Failure(busy)), "mx")
        group, text = self.fields(after(outcome))
        self.assertEqual(group["Status"], "4.4.7")
        self.assertEqual(group["Diagnostic-Code"], "smtp; 421 4.7.0 too many connections")
        self.assertIn(f"host {MX} said: 421 4.7.0 too many connections", text)

    def test_words_that_look_like_a_reply_do_not_make_it_remote(self) -> None:
        """Relay's own text starting with digits is still relay's: whose words is a field, not a pattern."""
        attempt = Attempt(time=ARRIVAL, outcome=OUTCOME_PERMANENT, status="5.4.4",
                          text="550 hosts listed, none usable", host=MX, remote=False, reason="dns")
        recipient = Recipient(address="bob@example.net", status=FAILED, last_error=attempt.reply, history=(attempt,))
        group, text = self.fields(recipient)
        self.assert_local(group, text, "5.4.4 550 hosts listed, none usable")


class NotificationDueTests(SynchronousTestCase):
    """notification_due: the one decision whether the sender is told."""

    def test_never_for_the_null_sender(self) -> None:
        """A message from <> owes no failure and no delay notice, whatever its recipients asked."""
        envelope = original_envelope(sender="")
        for params in ((), (("NOTIFY", "FAILURE,DELAY"),)):
            recipient = Recipient(address="bob@example.net", params=params)
            self.assertFalse(bounce.notification_due(envelope, recipient, "failed"))
            self.assertFalse(bounce.notification_due(envelope, recipient, "delayed"))

    def test_as_notify_asks_otherwise(self) -> None:
        """Without NOTIFY both are owed; NOTIFY=NEVER none; NOTIFY=DELAY only the delay notice."""
        envelope = original_envelope()
        plain = Recipient(address="a@example.net")
        never = Recipient(address="b@example.net", params=(("NOTIFY", "NEVER"),))
        delay = Recipient(address="c@example.net", params=(("NOTIFY", "DELAY"),))
        due = [(bounce.notification_due(envelope, r, "failed"), bounce.notification_due(envelope, r, "delayed"))
               for r in (plain, never, delay)]
        self.assertEqual(due, [(True, True), (False, False), (False, True)])


class ReadHeaderSectionTests(SynchronousTestCase):
    """The bounded read of the original header section."""

    def test_stops_at_the_empty_line(self) -> None:
        """The header section is returned without the empty line and without the body."""
        self.assertEqual(read_header_section(io.BytesIO(ORIGINAL)), ORIGINAL_HEADERS)

    def test_message_without_body(self) -> None:
        """A message that ends after its headers is all header section."""
        self.assertEqual(read_header_section(io.BytesIO(ORIGINAL_HEADERS)), ORIGINAL_HEADERS)

    def test_message_without_headers(self) -> None:
        """A message that starts with an empty line has an empty header section."""
        self.assertEqual(read_header_section(io.BytesIO(b"\r\nbody\r\n")), b"")

    def test_empty_line_across_chunks(self) -> None:
        """The end of the headers is found when the empty line straddles two reads."""
        headers = b"X-Pad: " + b"p" * (READ_CHUNK - 10) + b"\r\n"
        self.assertEqual(len(headers), READ_CHUNK - 1)
        data = headers + b"\r\n" + b"body " * 10000
        self.assertEqual(read_header_section(io.BytesIO(data)), headers)

    def test_bounded_to_the_limit(self) -> None:
        """A header section longer than the limit is cut after its last complete line within it."""
        line = b"X-Long: " + b"z" * 90 + b"\r\n"
        data = line * (2 * MAX_HEADER_OCTETS // len(line)) + b"\r\nbody\r\n"
        counting = CountingFile(io.BytesIO(data))
        section = read_header_section(counting)
        self.assertLessEqual(counting.read_octets, MAX_HEADER_OCTETS)
        self.assertLessEqual(len(section), MAX_HEADER_OCTETS)
        self.assertTrue(section.endswith(b"\r\n"))
        self.assertEqual(len(section) % len(line), 0)


class CountingFile:
    """A read-only file that counts the octets handed out."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.read_octets = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.read_octets += len(data)
        return data

    def __enter__(self) -> "CountingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


class CountingSpool(Spool):
    """A real spool that remembers how much of each opened message was read."""

    opened: list[CountingFile]

    def open_message(self, queue_id: str) -> Any:
        f = CountingFile(super().open_message(queue_id))
        self.opened.append(f)
        return f


class SendDsnTests(SynchronousTestCase):
    """send_dsn with a real spool on disk."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        directory = tempfile.mkdtemp(prefix="relay-bounce-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.spool = CountingSpool(directory, clock=self.clock, runner=sync_runner)
        self.spool.opened = []
        self.spool.recover()
        self.committed: list[str] = []
        self.spool.on_commit(lambda queue_id, envelope: self.committed.append(queue_id))

    def queue(self, envelope: Envelope, message: bytes = ORIGINAL) -> Envelope:
        incoming = self.spool.new_message()
        incoming.write(message)
        queue_id = self.successResultOf(incoming.commit(replace(envelope, queue_id=incoming.queue_id)))
        return self.spool.load(queue_id)

    def test_spools_a_notification_to_the_sender(self) -> None:
        """The notification is a new queued message from <> to the original sender only, with a local client."""
        original = self.queue(original_envelope())
        dsn_id = self.successResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW))
        self.assertNotEqual(dsn_id, original.queue_id)
        self.assertEqual(self.committed, [original.queue_id, dsn_id])
        stored = self.spool.load(dsn_id)
        self.assertEqual(stored.sender, "")
        self.assertEqual([r.address for r in stored.recipients], ["alice@example.org"])
        self.assertEqual(stored.recipients[0].status, PENDING)
        self.assertEqual(stored.client, ClientInfo(address="", helo=HOST, protocol="local"))
        self.assertEqual(stored.arrival, NOW)
        self.assertEqual(stored.body_type, "7BIT")
        self.assertFalse(stored.smtputf8)
        with self.spool.open_message(dsn_id) as f:
            raw = f.read()
        self.assertEqual(stored.size, len(raw))
        message = parse(raw)
        self.assertEqual(message["Message-ID"], f"<{dsn_id}@{HOST}>")
        self.assertIn("Subject: quarterly report", message.get_payload()[2].get_content())
        self.assertNotIn(b"secret body", raw)
        groups = status_groups(message.get_payload()[1])
        self.assertEqual(groups[0]["X-Relay-Queue-ID"], original.queue_id)
        self.assertEqual([g["Final-Recipient"] for g in groups[1:]],
                         ["rfc822; bob@example.net", "rfc822; carol@example.com"])

    def test_null_sender_gets_nothing(self) -> None:
        """A message from <> produces no notification: None and nothing spooled (no bounce loops)."""
        original = self.queue(original_envelope(sender=""))
        self.assertIsNone(self.successResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW)))
        self.assertEqual(self.spool.ids(), [original.queue_id])
        self.assertEqual(self.committed, [original.queue_id])
        self.assertEqual(self.spool.opened, [])

    def test_notify_never_gets_nothing(self) -> None:
        """Recipients that asked NOTIFY=NEVER (or not FAILURE) are left out; none left means no notification."""
        bob = Recipient(address="bob@example.net", params=(("NOTIFY", "NEVER"),), status=FAILED)
        carol = Recipient(address="carol@example.com", params=(("NOTIFY", "SUCCESS,DELAY"),), status=FAILED)
        original = self.queue(original_envelope(recipients=(bob, carol)))
        self.assertIsNone(self.successResultOf(send_dsn(self.spool, original, [bob, carol], HOST, NOW)))
        self.assertEqual(self.spool.ids(), [original.queue_id])

    def test_huge_body_is_never_read(self) -> None:
        """For a message of several megabytes only the header section (one small chunk) is read."""
        body = (b"z" * 998 + b"\r\n") * 5000
        original = self.queue(original_envelope(), ORIGINAL_HEADERS + b"\r\n" + body)
        self.assertGreater(original.size, 4_000_000)
        dsn_id = self.successResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW))
        self.assertIsNotNone(dsn_id)
        self.assertEqual(len(self.spool.opened), 1)
        self.assertLessEqual(self.spool.opened[0].read_octets, READ_CHUNK)
        self.assertLess(self.spool.load(dsn_id).size, 10_000)

    def test_non_ascii_sender_is_smtputf8(self) -> None:
        """A notification to a non-ASCII sender is spooled as SMTPUTF8 and 8BITMIME."""
        original = self.queue(original_envelope(sender="jörg@bücher.example"))
        dsn_id = self.successResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW))
        stored = self.spool.load(dsn_id)
        self.assertEqual(stored.recipients[0].address, "jörg@bücher.example")
        self.assertTrue(stored.smtputf8)
        self.assertEqual(stored.body_type, "8BITMIME")

    def test_delayed_notification_spooled(self) -> None:
        """A delay warning is spooled with the delayed subject and Will-Retry-Until."""
        original = self.queue(original_envelope(recipients=(dave_still_busy(),)))
        dsn_id = self.successResultOf(send_dsn(
            self.spool, original, list(original.recipients), HOST, NOW, action="delayed",
            retry_until=ARRIVAL + 5 * 86400))
        with self.spool.open_message(dsn_id) as f:
            message = parse(f.read())
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(status_groups(message.get_payload()[1])[1]["Action"], "delayed")

    def test_missing_message_bytes_still_notify(self) -> None:
        """When the original bytes are gone, the sender is still told, with an empty headers part."""
        original = self.queue(original_envelope())
        with sqlite3.connect(os.path.join(self.spool.directory, "queue.db")) as db:
            db.execute("DELETE FROM body WHERE id = ?", (original.queue_id,))
        dsn_id = self.successResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW))
        with self.spool.open_message(dsn_id) as f:
            message = parse(f.read())
        self.assertEqual(message.get_payload()[2].get_content().strip(), "")

    def test_spool_failure_errbacks(self) -> None:
        """When the spool cannot store the notification the Deferred fails and nothing is queued."""
        original = self.queue(original_envelope())

        def failing_runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
            return defer.fail(OSError(28, "No space left on device"))

        self.spool._runner = failing_runner
        failure = self.failureResultOf(send_dsn(self.spool, original, list(original.recipients), HOST, NOW))
        failure.trap(OSError)
        self.spool._runner = sync_runner
        self.assertEqual(self.spool.ids(), [original.queue_id])
        self.flushLoggedErrors(OSError)

    def test_build_error_errbacks_without_raising(self) -> None:
        """A bad action errbacks the Deferred instead of raising, and leaves no temporary file."""
        original = self.queue(original_envelope())
        self.failureResultOf(
            send_dsn(self.spool, original, list(original.recipients), HOST, NOW, action="bogus"), ValueError)
        self.assertEqual(self.spool.ids(), [original.queue_id])
        self.assertEqual(self.spool._fs.listdir(self.spool._tmp), [])


class ModuleTests(SynchronousTestCase):
    """Constants the scheduler relies on."""

    def test_actions(self) -> None:
        """The actions are the RFC 3464 words failed, delayed and relayed."""
        self.assertEqual(dsn_report.ACTIONS, ("failed", "delayed", "relayed"))
