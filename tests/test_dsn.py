"""DSN (RFC 3461): parameter syntax, passing the request on, and relay's own relayed and RET=FULL notices."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from relay.dsn_report import ACTION_RELAYED, build_dsn
from relay.envelope import DELIVERED
from relay.queue.rules import settle
from relay.queue.schema import QueueSummary
from relay.smtp import dsn
from relay.smtp.dsn import check_mail_param, check_rcpt_params, xtext_decode, xtext_encode
from test_bounce import HOST, NOW as BOUNCE_NOW, ORIGINAL_HEADERS, original_envelope, parse
from test_client import ClientTestCase, pump, transaction
from test_scheduler import NOW, FakeDSN, FakeDelivery, FakeSpool, delivered, envelope, scheduler


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_xtext_round_trip(text):
    """Any ASCII text survives xtext encoding, and the encoding is valid xtext."""
    encoded = xtext_encode(text)
    assert dsn.is_xtext(encoded) and xtext_decode(encoded) == text


@pytest.mark.parametrize("keyword,value,ok", [
    ("RET", "FULL", True), ("RET", "hdrs", True), ("RET", "BODY", False), ("RET", None, False),
    ("ENVID", "QQ314159", True), ("ENVID", "a+2Bb", True), ("ENVID", "a=b", False), ("ENVID", "a+2b", False),
    ("ENVID", "x" * 100, True), ("ENVID", "x" * 101, False), ("ENVID", None, False), ("ENVID", "", False),
])
def test_mail_parameters(keyword, value, ok):
    """RET is FULL or HDRS; ENVID is xtext of 1 to 100 characters; anything else is 501 5.5.4."""
    refusal = check_mail_param(keyword, value, ())
    assert (refusal is None) == ok
    if not ok:
        assert (refusal.code, refusal.status) == (501, "5.5.4")


def test_repeated_mail_parameter_is_refused():
    """A second RET (or ENVID) on one MAIL is 501 5.5.4."""
    assert check_mail_param("RET", "FULL", [("RET", "HDRS")]).code == 501


@pytest.mark.parametrize("params,smtputf8,ok", [
    ([("NOTIFY", "NEVER")], False, True),
    ([("NOTIFY", "success,FAILURE,Delay")], False, True),
    ([("NOTIFY", "NEVER,SUCCESS")], False, False),
    ([("NOTIFY", "SUCCESS,SUCCESS")], False, False),
    ([("NOTIFY", "ALWAYS")], False, False),
    ([("NOTIFY", None)], False, False),
    ([("ORCPT", "rfc822;bob@example.org")], False, True),
    ([("ORCPT", "rfc822;bob+2Bx@example.org")], False, True),
    ([("ORCPT", "rfc822;bob=x@example.org")], False, False),
    ([("ORCPT", "bob@example.org")], False, False),
    ([("ORCPT", "rfc822;")], False, False),
    ([("ORCPT", "utf-8;j\\x{F6}rg@example.org")], False, True),
    ([("ORCPT", "utf-8;jörg@example.org")], True, True),
    ([("ORCPT", "utf-8;jörg@example.org")], False, False),
    ([("ORCPT", "rfc822;" + "x" * 500)], False, False),
    ([("NOTIFY", "FAILURE"), ("NOTIFY", "DELAY")], False, False),
])
def test_rcpt_parameters(params, smtputf8, ok):
    """NOTIFY is NEVER or a list of SUCCESS/FAILURE/DELAY, ORCPT is addr-type;xtext, once each; else 501 5.5.4."""
    result = check_rcpt_params(params, smtputf8)
    if ok:
        assert result == tuple((k.upper(), v) for k, v in params)
    else:
        assert (result.code, result.status) == (501, "5.5.4")


def test_unknown_rcpt_parameter_is_unsupported():
    """A RCPT parameter that is not a DSN one is 555 5.5.4, as any unsupported parameter."""
    assert check_rcpt_params([("XFOO", "1")], False).code == 555


def test_notify_words_and_ret():
    """notify_words reads NOTIFY back as upper-case words (None without NOTIFY); ret_value reads RET."""
    assert dsn.notify_words((("NOTIFY", "success,delay"),)) == {"SUCCESS", "DELAY"}
    assert dsn.notify_words(()) is None
    assert dsn.ret_value((("RET", "hdrs"),)) == "HDRS" and dsn.ret_value(()) is None


class ClientPassesDSNTests(ClientTestCase):
    def dsn_transaction(self):
        return transaction(
            recipients=("a@dest.test", "b@dest.test"),
            mail_params=(("RET", "hdrs"), ("ENVID", "QQ314159")),
            rcpt_params=((("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;A@dest.test")), ()),
        )

    def test_parameters_go_to_a_next_hop_with_dsn(self):
        """To a peer that advertises DSN: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT (ORCPT added when absent)."""
        self.ready(caps=("PIPELINING", "DSN"))
        d = self.proto.send(self.dsn_transaction())
        self.assertEqual(self.sent(), (
            b"MAIL FROM:<s@src.test> RET=HDRS ENVID=QQ314159\r\n"
            b"RCPT TO:<a@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A@dest.test\r\n"
            b"RCPT TO:<b@dest.test> ORCPT=rfc822;b@dest.test\r\n"
            b"DATA\r\n"))
        self.server("250 ok", "250 ok", "250 ok", "354 go")
        pump(self.transport)
        self.server("250 queued")
        self.assertTrue(self.successResultOf(d).dsn)

    def test_parameters_stay_home_without_dsn(self):
        """To a peer without DSN nothing of it is sent, and the result says the request stayed here."""
        self.ready(caps=("PIPELINING",))
        d = self.proto.send(self.dsn_transaction())
        self.assertEqual(self.sent(), b"MAIL FROM:<s@src.test>\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        self.server("250 ok", "250 ok", "250 ok", "354 go")
        pump(self.transport)
        self.server("250 queued")
        self.assertFalse(self.successResultOf(d).dsn)


# -- the relay's own success notice and RET --------------------------------------------

SUCCESS = (("NOTIFY", "SUCCESS"),)


def with_params(env, params):
    return env.with_recipients([replace(r, params=params) for r in env.recipients])


@pytest.mark.parametrize("params,passed,sender,owed", [
    (SUCCESS, False, "s@origin.test", True),
    ((("NOTIFY", "SUCCESS,FAILURE"),), False, "s@origin.test", True),
    (SUCCESS, True, "s@origin.test", False),   # the next hop took the request on
    ((("NOTIFY", "FAILURE"),), False, "s@origin.test", False),
    ((), False, "s@origin.test", False),        # no NOTIFY: no success notice
    (SUCCESS, False, "", False),                # never a notice to <>
])
def test_settle_marks_a_relayed_notice_owed(params, passed, sender, owed):
    """A delivered recipient owes a relayed notice only with NOTIFY=SUCCESS, a next hop without DSN and a real sender."""
    env = with_params(envelope("a@a.test", sender=sender), params)
    [r] = settle(env, [replace(delivered("a@a.test"), dsn_passed=passed)], NOW, {}).recipients
    assert r.status == DELIVERED and r.relayed_notice == owed and r.awaiting_report == owed
    assert QueueSummary.of(env.with_recipients([r])).unreported == int(owed)


def test_scheduler_spools_the_relayed_notice_then_removes_the_message():
    """After a delivery that owes a relayed notice the scheduler spools it (action relayed) and removes the message."""
    env = with_params(envelope("a@a.test"), SUCCESS)
    spool, dsn_sender = FakeSpool([env]), FakeDSN()
    s, _ = scheduler(spool, FakeDelivery(lambda e: [delivered("a@a.test")]), send_dsn=dsn_sender)
    s.enqueue(env.queue_id)
    assert [(c["action"], c["recipients"]) for c in dsn_sender.calls] == [(ACTION_RELAYED, ["a@a.test"])]
    assert env.queue_id not in spool.envelopes


def test_relayed_notice_that_cannot_be_spooled_keeps_the_message():
    """When the notice cannot be spooled, the delivered recipient stays stored as owing it (not lost)."""
    env = with_params(envelope("a@a.test"), SUCCESS)
    spool = FakeSpool([env])
    s, _ = scheduler(spool, FakeDelivery(lambda e: [delivered("a@a.test")]), send_dsn=FakeDSN(fail=1))
    s.enqueue(env.queue_id)
    [r] = spool.envelopes[env.queue_id].recipients
    assert r.status == DELIVERED and r.relayed_notice and not r.reported


def test_relayed_report_says_relayed_with_a_2xx_status():
    """A relayed notice has Action relayed, a 2.x.x Status, the success subject and the headers only."""
    env = original_envelope()
    message = parse(build_dsn(env, list(env.recipients)[:1], ORIGINAL_HEADERS, HOST, BOUNCE_NOW, action=ACTION_RELAYED))
    assert message["Subject"] == "Successful Mail Delivery Report"
    status = next(p for p in message.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Action: relayed" in text and "Status: 2." in text
    assert [p.get_content_type() for p in message.iter_parts()][-1] == "text/rfc822-headers"


def test_failure_report_with_the_whole_original():
    """Given the whole original (RET=FULL), the third part is message/rfc822 holding it."""
    env = original_envelope()
    original = ORIGINAL_HEADERS + b"\r\nthe body\r\n"
    message = parse(build_dsn(env, list(env.recipients), ORIGINAL_HEADERS, HOST, BOUNCE_NOW, original=original))
    last = list(message.iter_parts())[-1]
    assert last.get_content_type() == "message/rfc822"
    assert b"the body" in last.as_bytes()
