"""Tests for the inbound input rules of relay.smtp.server: HELO names, paths, <postmaster>, hop counting, log lines."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher

from relay.log import TextLogObserver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server import DATE, code, deliver, ready, session, spool_of  # noqa: E402


def _refusal_log(lines: list[bytes]) -> list[str]:
    """Send ``lines`` to a session; the formatted events about refusals, and the text log written of all events."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        s = ready()
        for line in lines:
            assert s.send(line)[:1] in (b"5", b"2"), line
    finally:
        globalLogPublisher.removeObserver(events.append)
    out = io.StringIO()
    observer = TextLogObserver(out)
    for event in events:
        observer(event)
    observer.flush()
    refusals = [formatEvent(e) for e in events if "refused" in formatEvent(e)]
    assert refusals, [formatEvent(e) for e in events]
    return refusals + [out.getvalue()]


# -- HELO / EHLO names ----------------------------------------------------------------


def test_utf8_ehlo_name_is_written_as_a_label_in_received() -> None:
    """A UTF-8 EHLO name goes into the Received header (and the envelope) as its A-label form."""
    s = session(peer=IPv4Address("TCP", "192.0.2.7", 40001))
    assert code(s.send("EHLO Faß.example\r\n".encode())) == "250-relay"
    assert code(deliver(s, b"Subject: x\r\n\r\nbody\r\n.\r\n")) == "250 2.0.0"
    message = spool_of(s).messages[0]
    assert bytes(message.data).startswith(b"Received: from xn--fa-hia.example ([192.0.2.7])\r\n")
    assert bytes(message.data).isascii()
    assert message.envelope.client.helo == "xn--fa-hia.example"


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_non_idna_utf8_helo_name_refused(verb: bytes) -> None:
    """A non-ASCII HELO/EHLO name that is not a domain under IDNA 2008 (an emoji) gets 501 5.5.4."""
    s = session()
    assert code(s.send(verb + " \U0001f600.example\r\n".encode())) == "501 5.5.4"
    assert code(s.send(b"MAIL FROM:<s@x.test>\r\n")) == "503 5.5.1"


def test_ascii_helo_name_kept_as_sent() -> None:
    """An ASCII HELO name (even an address literal) is kept as the client sent it."""
    s = session()
    s.send(b"HELO [192.0.2.7]\r\n")
    assert s.proto.helo == "[192.0.2.7]"


# -- paths: IDNA 2008, normalised domains, what the client can send ----------------------


def test_fullwidth_relay_domain_accepted_and_forwarded_normalised() -> None:
    """A fullwidth spelling of a relay domain is accepted as that domain and stored (forwarded) in its normalised form."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")
    assert code(s.send("RCPT TO:<u@ｅｘａｍｐｌｅ.ｏｒｇ>\r\n".encode())) == "250 2.1.5"
    s.send(b"DATA\r\n")
    assert code(s.send(b"x\r\n.\r\n")) == "250 2.0.0"
    message = spool_of(s).messages[0]
    assert [r.address for r in message.envelope.recipients] == ["u@example.org"]
    assert b"\tfor <u@example.org>;" in bytes(message.data)


def test_u_label_domains_stored_normalised() -> None:
    """Sender and recipient domains with U-labels are stored in normalised spelling (lower case; faß, not fass)."""
    s = ready(relay_domains=("faß.de",))
    s.send("MAIL FROM:<jörg@Bücher.example> SMTPUTF8\r\n".encode())
    assert code(s.send("RCPT TO:<u@FAß.de>\r\n".encode())) == "250 2.1.5"
    s.send(b"DATA\r\n")
    s.send(b"x\r\n.\r\n")
    envelope = spool_of(s).messages[0].envelope
    assert envelope.sender == "jörg@bücher.example"
    assert [r.address for r in envelope.recipients] == ["u@faß.de"]


def test_fass_is_not_a_spelling_of_fass_with_sharp_s() -> None:
    """Under IDNA 2008 faß.de is not fass.de: a relay domain fass.de does not accept mail for faß.de."""
    s = ready(relay_domains=("fass.de",))
    s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")
    assert code(s.send("RCPT TO:<u@faß.de>\r\n".encode())) == "554 5.7.1"


@pytest.mark.parametrize("domain", ["\U0001f600.example", "☃.example", "xn--ls8h.example"])
def test_domain_invalid_under_idna_2008_gets_553(domain: str) -> None:
    """A recipient or sender domain IDNA 2008 refuses gets a clear 553 naming IDNA 2008."""
    s = ready()
    out = s.send(f"MAIL FROM:<s@{domain}> SMTPUTF8\r\n".encode())
    assert out.startswith(b"553 5.1.7") and b"IDNA 2008" in out
    s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")
    out = s.send(f"RCPT TO:<u@{domain}>\r\n".encode())
    assert out.startswith(b"553 5.1.3") and b"IDNA 2008" in out


@pytest.mark.parametrize("local", ['"x>; BODY=8BITMIME <y"', '"a<b"', '"<>"'])
def test_quoted_local_part_the_client_cannot_send_refused_at_rcpt(local: str) -> None:
    """A quoted local part with '<' or '>' (refused by the client when sending) gets 553 at RCPT, not 250."""
    s = ready(trusted_networks=())
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(f"RCPT TO:<{local}@example.org>\r\n".encode())) == "553 5.1.3"
    assert code(s.send(b"RCPT TO:<u@example.org>\r\n")) == "250 2.1.5"


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\u202e"])
def test_unicode_separators_refused_in_smtputf8_addresses(char: str) -> None:
    """U+2028, U+2029, C1 controls and bidi overrides are refused in SMTPUTF8 addresses (never copied into Received)."""
    s = ready()
    assert code(s.send(f"MAIL FROM:<a{char}b@x.test> SMTPUTF8\r\n".encode())) == "501 5.1.7"
    s.send(b"MAIL FROM:<s@x.test> SMTPUTF8\r\n")
    assert code(s.send(f"RCPT TO:<a{char}b@example.org>\r\n".encode())) == "501 5.1.3"


# -- <postmaster> -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"<postmaster>", b"<PostMaster>"])
def test_rcpt_postmaster_accepted_from_anyone_and_goes_to_the_default(path: bytes) -> None:
    """RCPT TO:<postmaster> (any case) is accepted from an untrusted client and delivered to postmaster@<hostname>."""
    s = ready(trusted_networks=(), relay_domains=())
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(b"RCPT TO:" + path + b"\r\n")) == "250 2.1.5"
    s.send(b"DATA\r\n")
    assert code(s.send(b"x\r\n.\r\n")) == "250 2.0.0"
    assert [r.address for r in spool_of(s).messages[0].envelope.recipients] == ["postmaster@relay.test"]


def test_rcpt_postmaster_goes_to_the_configured_address() -> None:
    """With [server] postmaster set, <postmaster> is delivered to that address."""
    s = ready(trusted_networks=(), postmaster="admin@ops.example")
    s.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<POSTMASTER>\r\nDATA\r\n")
    s.send(b"x\r\n.\r\n")
    assert [r.address for r in spool_of(s).messages[0].envelope.recipients] == ["admin@ops.example"]


def test_other_local_parts_without_domain_still_refused() -> None:
    """Only postmaster is accepted without a domain; <root> still gets 501 5.1.3."""
    s = ready()
    s.send(b"MAIL FROM:<s@x.test>\r\n")
    assert code(s.send(b"RCPT TO:<root>\r\n")) == "501 5.1.3"


# -- the loop limit -------------------------------------------------------------------------


def _received(count: int, form: bytes) -> bytes:
    return b"".join(form + b" from h%d.test by x.test; %s\r\n" % (i, DATE.encode()) for i in range(count))


@pytest.mark.parametrize("form", [b"Received :", b"RECEIVED\t:", b"received  :", b"rEcEiVeD:"])
def test_loop_limit_counts_obsolete_and_any_case_received(form: bytes) -> None:
    """101 Received fields in any case, with white space before the colon, are refused as a loop (554 5.4.6)."""
    s = ready()
    assert code(deliver(s, _received(101, form) + b"\r\nbody\r\n.\r\n")) == "554 5.4.6"


def test_loop_limit_mixed_forms_hundred_pass() -> None:
    """100 Received fields of mixed spellings pass; a Received-SPF field or a folded line is not a hop."""
    s = ready()
    content = (_received(50, b"Received :") + _received(50, b"Received:") + b"Received-SPF: pass\r\n"
               + b"X-Note: x\r\n received: folded\r\n\r\nbody\r\n.\r\n")
    assert code(deliver(s, content)) == "250 2.0.0"


# -- log lines about refused commands -------------------------------------------------------


@pytest.mark.parametrize("line", [b"MAI\rL FROM:<a@b>\r\n", b"X\x1b[2J\r\n", b"\x7fDEL\r\n",
                                  "NO\u2028OP\r\n".encode(), b"HELO a\rb\r\n"])
def test_control_characters_escaped_in_refusal_log_lines(line: bytes) -> None:
    """CR, other C0 controls, DEL and U+2028 in a refused command are escaped in the log line about it."""
    for text in _refusal_log([line]):
        assert not any(c in text for c in "\r\x1b\x7f\u2028\u2029"), repr(text)
    assert "\\x0d" in "".join(_refusal_log([b"MAI\rL FROM:<a@b>\r\n"]))


def test_refusal_log_escapes_reason_text() -> None:
    """The reason text of a refused path is escaped too: a U+2028 in an address never reaches the log raw."""
    lines = _refusal_log([b"MAIL FROM:<s@x.test> SMTPUTF8\r\n", "RCPT TO:<a\u2028b@example.org>\r\n".encode()])
    assert any("U+2028" in text for text in lines)
    for text in lines:
        assert "\u2028" not in text


def test_text_log_escapes_controls_in_any_line() -> None:
    """The daemon's text log writes CR and U+2029 in any event as escapes, so no line can be forged."""
    out = io.StringIO()
    observer = TextLogObserver(out)
    from relay.log import Logger
    events: list[dict] = []
    Logger(namespace="t", observer=events.append).info("peer said {x}", x="a\r2026-01-01 fake\u2029b")
    observer(events[0])
    observer.flush()
    written = out.getvalue()
    assert "\r" not in written and "\u2029" not in written
    assert "a\\x0d2026-01-01 fake\\u2029b" in written and written.count("\n") == 1


def test_helo_names_are_checked_as_printable_words_for_every_code_point() -> None:
    """A HELO name is valid exactly when each character is printable and not white space, for every code point."""
    import sys

    from relay.smtp.ehlo import _valid_helo

    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert _valid_helo("a" + char) == (char.isprintable() and not char.isspace()), hex(code)
