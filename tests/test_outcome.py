"""Tests for relay.outcome: the one classification of attempts, typed reasons, and whose words an outcome holds."""

from __future__ import annotations

import errno

import pytest
from twisted.internet import error as neterror
from twisted.python.failure import Failure

from relay.envelope import OUTCOME_DELIVERED, OUTCOME_PERMANENT, OUTCOME_TRANSIENT, Route
from relay.outcome import (
    STAGE_CONNECT,
    STATUS_NO_ANSWER,
    TEXT_INTERNAL,
    LocalReply,
    Reason,
    classify,
    internal_outcome,
    kind_of,
    local_outcome,
    network_reason,
    reject_outcome,
    reply_outcome,
    resolution_outcome,
    status_kind,
    unreachable,
    unreachable_outcome,
)
from relay.smtp.transaction import REPLY_NO_SMTPUTF8, STAGE_GREETING, STAGE_LOST, SessionError
from relay.smtp.replies import Reply

WHERE = "mx1.a.test[127.0.0.2]:25"
HOST = "mx1.a.test[127.0.0.2]"


@pytest.mark.parametrize(
    "code, kind",
    [(250, OUTCOME_DELIVERED), (251, OUTCOME_DELIVERED), (221, OUTCOME_DELIVERED),
     (421, OUTCOME_TRANSIENT), (450, OUTCOME_TRANSIENT), (452, OUTCOME_TRANSIENT),
     (550, OUTCOME_PERMANENT), (552, OUTCOME_PERMANENT), (554, OUTCOME_PERMANENT),
     (354, OUTCOME_TRANSIENT), (0, OUTCOME_TRANSIENT), (199, OUTCOME_TRANSIENT), (600, OUTCOME_TRANSIENT)],
)
def test_reply_codes_fall_into_their_buckets(code: int, kind: str) -> None:
    """2xx is delivered, 5xx permanent, and anything else (4xx, an unexpected code, none) transient."""
    assert classify(code) == kind


@pytest.mark.parametrize(
    "status, kind",
    [("2.0.0", OUTCOME_DELIVERED), ("4.4.1", OUTCOME_TRANSIENT), ("4.4.3", OUTCOME_TRANSIENT),
     ("5.1.2", OUTCOME_PERMANENT), ("5.1.10", OUTCOME_PERMANENT), ("", OUTCOME_TRANSIENT)],
)
def test_relays_own_decisions_follow_their_enhanced_status(status: str, kind: str) -> None:
    """A decision without a reply code is classified by its enhanced status class; none is transient."""
    assert status_kind(status) == kind
    assert kind_of(0, status) == kind


def test_a_reply_code_outranks_its_status() -> None:
    """With a reply code the code decides, whatever status class the peer put beside it."""
    assert kind_of(550, "4.0.0") == OUTCOME_PERMANENT
    assert kind_of(451, "5.0.0") == OUTCOME_TRANSIENT


@pytest.mark.parametrize(
    "error, reason",
    [
        (neterror.getConnectError((errno.ECONNREFUSED, "anything at all")), Reason.CONNECT_REFUSED),
        (neterror.getConnectError((errno.ETIMEDOUT, "anything at all")), Reason.CONNECT_TIMEOUT),
        (neterror.getConnectError((errno.ENETUNREACH, "anything at all")), Reason.NO_ROUTE),
        (neterror.getConnectError((errno.EHOSTUNREACH, "anything at all")), Reason.NO_ROUTE),
        (neterror.TimeoutError(), Reason.CONNECT_TIMEOUT),
        (neterror.ConnectionLost(), Reason.LOST),
        (neterror.ConnectionDone(), Reason.LOST),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reason.CONNECT_REFUSED),
        (OSError(errno.EHOSTUNREACH, "x"), Reason.NO_ROUTE),
        (OSError(errno.EACCES, "x"), Reason.CONNECT_FAILED),
        (neterror.ConnectError(string="Connection refused, timed out, no route"), Reason.CONNECT_FAILED),
        (ValueError("Connection refused"), Reason.LOCAL_ERROR),
    ],
)
def test_network_reasons_come_from_the_exception_type(error: BaseException, reason: Reason) -> None:
    """Twisted's and the OS's connection errors map by type and errno; their words never matter."""
    assert network_reason(error) == reason


def test_session_errors_carry_their_reason() -> None:
    """A SessionError names its reason, given or by stage, and network_reason reads it from there."""
    assert network_reason(SessionError(None, True, STAGE_CONNECT, "x", Reason.NO_ROUTE)) == Reason.NO_ROUTE
    assert SessionError(Reply(421, "4.3.2", "busy"), True, STAGE_GREETING).reason == Reason.SESSION_REFUSED
    assert SessionError(None, True, STAGE_LOST).reason == Reason.LOST
    assert SessionError(None, True, "timeout").reason == Reason.TIMEOUT


def test_a_peers_reply_is_remote_and_a_made_up_one_is_not() -> None:
    """reply_outcome marks a peer's reply remote; a LocalReply (relay's own refusal) is local with its reason."""
    remote = reply_outcome("u@a.test", Reply(550, "5.1.1", "no such\nuser"), HOST, "mx")
    assert (remote.kind, remote.code, remote.status, remote.text, remote.remote, remote.reason) == (
        OUTCOME_PERMANENT, 550, "5.1.1", "no such user", True, "")
    too_big = LocalReply(552, "5.3.4", "message size 9 exceeds the remote server's limit of 1 octets", Reason.MESSAGE_TOO_BIG)
    local = reply_outcome("u@a.test", too_big, HOST, "mx")
    assert (local.kind, local.code, local.status, local.remote, local.reason) == (
        OUTCOME_PERMANENT, 552, "5.3.4", False, "message-too-big")
    assert reply_outcome("u@a.test", REPLY_NO_SMTPUTF8, HOST, "mx").reason == "no-smtputf8"


def test_local_outcomes_take_their_bucket_from_their_status() -> None:
    """DNS, reject routes and local errors are relay's words (code 0 but the reject), bucketed by status."""
    nx = resolution_outcome("u@nx.test", "5.1.2", "domain nx.test does not exist", "mx")
    assert (nx.kind, nx.code, nx.text, nx.remote, nx.reason) == (
        OUTCOME_PERMANENT, 0, "DNS: domain nx.test does not exist", False, "dns")
    assert resolution_outcome("u@a.test", "4.4.3", "DNS: timed out", "").kind == OUTCOME_TRANSIENT
    reject = reject_outcome("u@a.test", Route(kind="reject", reason="not here", rule="routes[0]"))
    assert (reject.kind, reject.code, reject.status, reject.remote, reject.reason) == (
        OUTCOME_PERMANENT, 550, "5.7.1", False, "reject-route")
    internal = internal_outcome("u@a.test")
    assert (internal.kind, internal.status, internal.text, internal.reason) == (
        OUTCOME_TRANSIENT, "4.3.0", TEXT_INTERNAL, "local-error")
    assert local_outcome("u@a.test", Reason.NO_TARGETS, STATUS_NO_ANSWER, "no address").kind == OUTCOME_TRANSIENT


def test_an_unreachable_host_that_said_something_is_reported_in_its_words() -> None:
    """A greeting refused with 421 ends transient with the peer's code, status and text, marked remote."""
    busy = SessionError(Reply(421, "4.7.0", "too many connections"), True, STAGE_GREETING)
    last = unreachable(WHERE, HOST, Failure(busy))
    assert last.text == f"{WHERE} said: 421 4.7.0 too many connections (at greeting)"
    outcome = unreachable_outcome("u@a.test", last, "mx")
    assert (outcome.kind, outcome.code, outcome.status, outcome.text, outcome.host, outcome.remote, outcome.reason) == (
        OUTCOME_TRANSIENT, 421, "4.7.0", "too many connections", HOST, True, "session-refused")


def test_an_auth_refusal_stays_transient_in_the_peers_words() -> None:
    """A 535 to AUTH is transient on purpose (configuration), yet reported as what the peer said."""
    refused = SessionError(Reply(535, "5.7.8", "bad credentials"), True, "auth", "authentication failed")
    outcome = unreachable_outcome("u@a.test", unreachable(WHERE, HOST, Failure(refused)), "")
    assert (outcome.kind, outcome.code, outcome.status, outcome.remote, outcome.reason) == (
        OUTCOME_TRANSIENT, 535, "5.7.8", True, "auth-failed")


@pytest.mark.parametrize(
    "error, text, reason",
    [
        (SessionError(None, True, STAGE_CONNECT, "cannot connect", Reason.CONNECT_REFUSED),
         f"connect to {WHERE}: Connection refused", "connect-refused"),
        (neterror.getConnectError((errno.ETIMEDOUT, "whatever Twisted says")),
         f"connect to {WHERE}: Connection timed out", "connect-timeout"),
        (SessionError(None, True, STAGE_LOST, "connection to mx1.a.test lost"),
         f"{WHERE}: connection to mx1.a.test lost", "connection-lost"),
        (KeyError("secret detail"), f"{WHERE}: {TEXT_INTERNAL}", "local-error"),
    ],
)
def test_an_unreachable_host_without_a_reply_is_relays_own_words(error: BaseException, text: str, reason: str) -> None:
    """Connection failures end transient 4.4.1 in fixed words naming the host, never the exception's text."""
    outcome = unreachable_outcome("u@a.test", unreachable(WHERE, HOST, Failure(error)), "mx")
    assert (outcome.kind, outcome.code, outcome.status, outcome.text, outcome.remote, outcome.reason) == (
        OUTCOME_TRANSIENT, 0, "4.4.1", text, False, reason)
    assert "secret" not in outcome.text and "whatever" not in outcome.text
