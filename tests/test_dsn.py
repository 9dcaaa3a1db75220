"""DSN parameters (RFC 3461): their syntax, and the client passing them on to a next hop with DSN."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.smtp import dsn
from relay.smtp.dsn import check_mail_param, check_rcpt_params, xtext_decode, xtext_encode
from test_client import ClientTestCase, pump, transaction


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
