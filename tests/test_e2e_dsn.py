"""End to end: DSN requests (RFC 3461) through a real twistd, with aiosmtpd next hops with and without DSN.

smtplib submits with RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT.  A next hop
that advertises DSN gets the request passed on (and relay sends no success
notice of its own); one without DSN gets plain MAIL/RCPT, and relay reports
``Action: relayed`` itself when NOTIFY asked for SUCCESS.  Notifications go
to the sender's domain, routed to a third sink that collects them.
"""

from __future__ import annotations

import email
import smtplib
from email import policy

import pytest

from relayproc import RelayProcess, free_port, wait_until
from smtpsink import SMTPSink

SENDER = "app@origin.test"


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("dsn")
    port = free_port("127.0.0.2")
    with_dsn = SMTPSink("127.0.0.2", port, dsn=True).start()
    request.addfinalizer(with_dsn.stop)
    refuse = {"bad@plain.test", "quiet@plain.test"}
    without = SMTPSink("127.0.0.3", port, rcpt_reply=lambda a: "550 5.1.1 no such user" if a in refuse else None).start()
    request.addfinalizer(without.stop)
    reports = SMTPSink("127.0.0.4", port).start()
    request.addfinalizer(reports.stop)
    relay = RelayProcess(tmp / "relay", f'''
hostname = "relay.test"
[delivery]
port = {port}

[[routes]]
domains = ["dsn.test"]
smarthost = "127.0.0.2"

[[routes]]
domains = ["plain.test"]
smarthost = "127.0.0.3"

[[routes]]
domains = ["origin.test"]
smarthost = "127.0.0.4"
''')
    request.addfinalizer(relay.kill)
    relay.start()
    return relay, with_dsn, without, reports


def submit(port: int, recipient: str, mail_options: list[str], rcpt_options: list[str], body: str = "hello") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example.org")
        assert s.has_extn("dsn")
        s.sendmail(SENDER, [recipient], f"Subject: dsn test\r\n\r\n{body}\r\n".encode(), mail_options, rcpt_options)


def reports_about(sink: SMTPSink, address: str) -> list:
    with sink.lock:
        return [email.message_from_bytes(m.data, policy=policy.default) for m in sink.messages
                if f"Final-Recipient: rfc822; {address}".encode() in m.data]


def status_fields(report) -> dict[str, str]:
    """The per-recipient fields of the delivery-status part, as one dict (one recipient per report here)."""
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    fields: dict[str, str] = {}
    for block in part.get_payload():
        for key, value in block.items():
            fields[key] = str(value)
    return fields


def test_dsn_request_travels_to_a_next_hop_with_dsn(world):
    """A next hop advertising DSN gets RET, ENVID, NOTIFY and ORCPT as sent; relay sends no notice of its own."""
    relay, with_dsn, _, reports = world
    submit(relay.port, "u@dsn.test", ["RET=HDRS", "ENVID=QQ314159"], ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;U@dsn.test"])
    with_dsn.wait_for(1)
    assert ["RET=HDRS", "ENVID=QQ314159"] in with_dsn.dsn_mail
    assert ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;U@dsn.test"] in with_dsn.dsn_rcpt
    # The relayed notice of the next test arrives after this delivery: none about u@dsn.test by then.
    submit(relay.port, "v@plain.test", ["ENVID=QQ271828"], ["NOTIFY=SUCCESS", "ORCPT=rfc822;V@plain.test"])
    wait_until(lambda: reports_about(reports, "v@plain.test"), what="the relayed notice")
    assert reports_about(reports, "u@dsn.test") == []


def test_relay_reports_relayed_for_a_next_hop_without_dsn(world):
    """NOTIFY=SUCCESS to a next hop without DSN: one DSN with Action relayed, the ENVID and the ORCPT."""
    relay, _, without, reports = world
    submit(relay.port, "w@plain.test", ["ENVID=QQ161803"], ["NOTIFY=SUCCESS", "ORCPT=rfc822;W@plain.test"])
    [report] = wait_until(lambda: reports_about(reports, "w@plain.test"), what="the relayed notice")
    fields = status_fields(report)
    assert fields["Action"] == "relayed" and fields["Status"].startswith("2.")
    assert fields["Original-Envelope-Id"] == "QQ161803"
    assert fields["Original-Recipient"] == "rfc822; W@plain.test"
    assert report["Subject"] == "Successful Mail Delivery Report"
    with without.lock:
        assert any("w@plain.test" in m.recipients for m in without.messages)
    assert "NOTIFY" not in " ".join(without.raw_rcpts)


def test_failure_with_ret_full_returns_the_whole_message(world):
    """A refused recipient with RET=FULL gets a failure DSN with the message as message/rfc822."""
    relay, _, _, reports = world
    submit(relay.port, "bad@plain.test", ["RET=FULL"], ["NOTIFY=FAILURE"], body="the body that comes back")
    [report] = wait_until(lambda: reports_about(reports, "bad@plain.test"), what="the failure notice")
    assert status_fields(report)["Action"] == "failed"
    returned = next(p for p in report.walk() if p.get_content_type() == "message/rfc822")
    assert b"the body that comes back" in returned.as_bytes()


def test_notify_never_sends_nothing_and_success_only_skips_failures(world):
    """NOTIFY=NEVER and NOTIFY=SUCCESS on a refused recipient: no failure DSN for either."""
    relay, _, without, reports = world
    submit(relay.port, "quiet@plain.test", [], ["NOTIFY=NEVER"])
    submit(relay.port, "x@plain.test", [], ["NOTIFY=FAILURE"])  # delivered: no notice asked for success
    wait_until(lambda: any("x@plain.test" in m.recipients for m in without.messages), what="x@plain.test delivered")
    submit(relay.port, "bad@plain.test", ["RET=HDRS"], ["NOTIFY=FAILURE"])  # a marker that comes after
    wait_until(lambda: len(reports_about(reports, "bad@plain.test")) >= 2, what="the marker failure notice")
    assert reports_about(reports, "quiet@plain.test") == [] and reports_about(reports, "x@plain.test") == []
