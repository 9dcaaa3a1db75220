"""End-to-end DKIM signing: smtplib submits to ``twistd -n relay``, aiosmtpd sinks on loopback
receive, and dkimpy verifies what arrived against keys published by a twisted.names DNS server
on loopback (the relay reads the same server for MX lookups)."""

from __future__ import annotations

import smtplib
import subprocess
import threading
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from typing import Optional

import pytest

from dkimkeys import loopback_dns, signatures, verify_all, write_key
from dnsserver import start_dns_server
from relay.dkim import load_key
from relayproc import RelayProcess, free_port, relay_env, wait_until
from smtpsink import SMTPSink

SINKS = {"example.net": "127.0.0.2", "other.test": "127.0.0.3", "retry.test": "127.0.0.5"}


class OnceRefused:
    """451 for the first DATA, then acceptance."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> Optional[str]:
        with self.lock:
            self.calls += 1
            return "451 4.3.0 try again later" if self.calls == 1 else None


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """Keys for example.org (RSA) and mail.example.org (Ed25519), published; three sinks; one relay."""
    tmp = tmp_path_factory.mktemp("dkim-e2e")
    keys = {
        "rsa": load_key(str(write_key(tmp / "org.pem", "rsa")), "example.org", "s2026"),
        "ed": load_key(str(write_key(tmp / "mail.pem", "ed25519")), "mail.example.org", "ed1"),
    }
    zone: dict = {key.record_name: {"TXT": [key.txt_record()]} for key in keys.values()}
    for domain, ip in SINKS.items():
        zone[domain] = {"MX": [[10, f"mx.{domain}"]]}
        zone[f"mx.{domain}"] = {"A": [ip]}
    dns_port, stop_dns = start_dns_server(zone, tmp)
    request.addfinalizer(stop_dns)
    port = free_port("127.0.0.2")
    refusals = OnceRefused()
    sinks = {}
    for domain, ip in SINKS.items():
        sinks[domain] = SMTPSink(ip, port, data_reply=refusals if domain == "retry.test" else None).start()
        request.addfinalizer(sinks[domain].stop)
    relay = RelayProcess(tmp / "relay", f'''
hostname = "relay.example.org"

[queue]
min_retry = "1s"
max_retry = "2s"

[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]

[[dkim]]
domain = "example.org"
selector = "s2026"
private_key = "{tmp / 'org.pem'}"

[[dkim]]
domain = "mail.example.org"
selector = "ed1"
private_key = "{tmp / 'mail.pem'}"
''')
    request.addfinalizer(relay.kill)
    relay.start()
    return {"relay": relay, "sinks": sinks, "dns": loopback_dns(dns_port), "refusals": refusals, "tmp": tmp}


def send(world, sender: str, recipients: list[str], data: bytes, **options) -> None:
    with smtplib.SMTP("127.0.0.1", world["relay"].port, timeout=10) as s:
        s.ehlo("app.example.org")
        s.sendmail(sender, recipients, data, **options)


def arrived(world, domain: str, address: str):
    """Wait (bounded) for the one message for ``address`` at the sink of ``domain``."""
    sink = world["sinks"][domain]

    def found():
        with sink.lock:
            return [m for m in sink.messages if address in m.recipients]
    messages = wait_until(found, what=f"{address} at {sink.host}")
    assert len(messages) == 1
    return messages[0]


def text_message(sender: str, to: str, subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}").encode("utf-8")


def test_relayed_mail_arrives_with_a_signature_that_verifies(world) -> None:
    """Mail from example.org leaves with one rsa-sha256 relaxed/relaxed signature, d=example.org, that verifies."""
    send(world, "app@example.org", ["bob@example.net"], text_message("App <app@example.org>", "bob@example.net", "plain"))
    data = arrived(world, "example.net", "bob@example.net").data
    [tags] = signatures(data)
    assert (tags[b"d"], tags[b"s"], tags[b"a"], tags[b"c"]) == (b"example.org", b"s2026", b"rsa-sha256",
                                                                 b"relaxed/relaxed")
    assert data.startswith(b"DKIM-Signature: ")
    assert verify_all(data, world["dns"]) == [True]
    assert verify_all(data.replace(b"Hello.", b"Hullo."), world["dns"]) == [False]
    wait_until(lambda: ": signed d=example.org s=s2026 (rsa)" in world["relay"].log(), what="the log line")


def test_most_specific_entry_signs_subdomain_mail(world) -> None:
    """From: @mail.example.org is signed by the mail.example.org entry (Ed25519), not the parent's."""
    send(world, "app@mail.example.org", ["ed@example.net"],
         text_message("app@mail.example.org", "ed@example.net", "subdomain"))
    data = arrived(world, "example.net", "ed@example.net").data
    assert [(t[b"d"], t[b"a"]) for t in signatures(data)] == [(b"mail.example.org", b"ed25519-sha256")]
    assert verify_all(data, world["dns"]) == [True]


def test_eight_bit_message_verifies(world) -> None:
    """An 8BITMIME message with a raw UTF-8 body arrives signed and verifies."""
    body = "Grüße aus Köln — ümlaut text.\r\n"
    data = text_message("app@example.org", "eight@example.net", "eight bit", body)
    send(world, "app@example.org", ["eight@example.net"], data, mail_options=["BODY=8BITMIME"])
    m = arrived(world, "example.net", "eight@example.net")
    assert "Grüße".encode() in m.data
    assert verify_all(m.data, world["dns"]) == [True]


def test_smtputf8_message_verifies(world) -> None:
    """An SMTPUTF8 message (UTF-8 addresses and headers) arrives signed for its From: domain and verifies."""
    message = EmailMessage(policy=SMTPUTF8)
    message["From"] = "Jörg <jörg@example.org>"
    message["To"] = "zoë@example.net"
    message["Subject"] = "Grüße"
    message.set_content("Hallo Zoë.\n", cte="8bit")
    send(world, "jörg@example.org", ["zoë@example.net"], message.as_bytes(), mail_options=["SMTPUTF8"])
    m = arrived(world, "example.net", "zoë@example.net")
    assert "From: Jörg <jörg@example.org>".encode() in m.data
    assert [t[b"d"] for t in signatures(m.data)] == [b"example.org"]
    assert verify_all(m.data, world["dns"]) == [True]


def test_multipart_message_verifies(world) -> None:
    """A multipart/mixed message with a binary attachment arrives signed and verifies."""
    message = EmailMessage(policy=SMTP)
    message["From"] = "reports@example.org"
    message["To"] = "multi@example.net"
    message["Subject"] = "report"
    message.set_content("The report is attached.\n")
    message.add_alternative("<p>The report is attached.</p>\n", subtype="html")
    message.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream",
                           filename="report.bin")
    send(world, "reports@example.org", ["multi@example.net"], message.as_bytes())
    m = arrived(world, "example.net", "multi@example.net")
    tags = signatures(m.data)[0]
    assert b"content-type" in tags[b"h"].replace(b" ", b"").split(b":")
    assert b"multipart/mixed" in m.data
    assert verify_all(m.data, world["dns"]) == [True]


def test_retried_message_sends_the_same_signed_bytes(world) -> None:
    """After a 451, the retry carries the very bytes of the first attempt, and they verify."""
    send(world, "app@example.org", ["later@retry.test"], text_message("app@example.org", "later@retry.test", "retry"))
    m = arrived(world, "retry.test", "later@retry.test")
    [first] = [r for r in world["sinks"]["retry.test"].refused if "later@retry.test" in r.recipients]
    assert first.data == m.data
    assert len(signatures(m.data)) == 1
    assert verify_all(m.data, world["dns"]) == [True]


def test_every_destination_gets_the_same_signed_bytes(world) -> None:
    """One message to two domains: both copies are identical and verify."""
    send(world, "app@example.org", ["one@example.net", "two@other.test"],
         text_message("app@example.org", "one@example.net, two@other.test", "two destinations"))
    first = arrived(world, "example.net", "one@example.net").data
    second = arrived(world, "other.test", "two@other.test").data
    assert first == second
    assert verify_all(first, world["dns"]) == [True]


@pytest.mark.parametrize("sender, from_field, reason", [
    ("x@elsewhere.test", "x@elsewhere.test", None),
    ("app@example.org", "a@example.org, b@example.org", "2 From: addresses"),
])
def test_unmatched_or_ambiguous_from_is_sent_unsigned(world, sender: str, from_field: str,
                                                     reason: Optional[str]) -> None:
    """A From: domain without an entry, or several From: addresses, is relayed without a signature
    (the latter with a log line saying why)."""
    to = f"unsigned{len(from_field)}@example.net"
    send(world, sender, [to], text_message(from_field, to, "unsigned"))
    assert signatures(arrived(world, "example.net", to).data) == []
    if reason:
        wait_until(lambda: f"not signed: {reason}" in world["relay"].log(), what="the log line")


def test_daemon_refuses_to_start_with_a_readable_key(tmp_path) -> None:
    """twistd relay with a key that others may read exits non-zero with one line naming key and file."""
    key = write_key(tmp_path / "open.pem", "ed25519", mode=0o644)
    relay = RelayProcess(tmp_path / "r", f'[[dkim]]\ndomain = "example.org"\nselector = "s"\nprivate_key = "{key}"\n')
    done = subprocess.run(relay.command(), cwd=relay.workdir, env=relay_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=60)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).decode().strip().splitlines()
    assert lines == [f"{relay.config_path}: dkim[0].private_key: {str(key)!r}: "
                     "group or others may access it (mode 0644): chmod 600 it"]
