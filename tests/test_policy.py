"""Tests for relay.policy: who may relay to which recipient."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from relay.config import ServerConfig
from relay.envelope import ClientInfo, Recipient
from relay.policy import RelayPolicy
from relay.smtp.address import parse_path
from relay.smtp.replies import RELAY_DENIED, Reply

SERVER = ServerConfig(
    relay_domains=("example.org", ".corp.example.org", "bücher.example"),
    trusted_networks=(
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("2001:db8:1::/48"),
    ),
)
UNTRUSTED = ClientInfo(address="192.0.2.7")
TRUSTED = ClientInfo(address="127.0.0.1", trusted=True)
AUTHENTICATED = ClientInfo(address="192.0.2.7", auth_user="alice")
REJECT = Reply(550, "5.7.1", "no mail to this domain")


def rcpt(address: str, route: tuple[str, ...] = ()) -> Recipient:
    return Recipient(address=address, source_route=route)


# -- is_trusted -----------------------------------------------------------------


@pytest.mark.parametrize("ip, trusted", [
    ("127.0.0.1", True),
    ("127.255.0.9", True),
    ("10.1.200.3", True),
    ("10.2.0.1", False),
    ("192.0.2.7", False),
    ("::1", True),
    ("2001:db8:1::25", True),
    ("2001:db8:2::25", False),
    ("::ffff:127.0.0.1", True),
    ("::ffff:10.1.0.1", True),
    ("::ffff:192.0.2.7", False),
    ("fe80::1%eth0", False),
    ("", False),
    ("not an address", False),
    ("300.1.1.1", False),
])
def test_is_trusted(ip: str, trusted: bool) -> None:
    """Trusted networks match IPv4 and IPv6 peers; IPv4-mapped IPv6 counts as IPv4; junk is untrusted."""
    assert RelayPolicy(SERVER).is_trusted(ip) is trusted


def test_default_config_trusts_loopback_only() -> None:
    """With the default configuration loopback is trusted and nothing else."""
    policy = RelayPolicy(ServerConfig())
    assert policy.is_trusted("127.0.0.1") and policy.is_trusted("::1")
    assert not policy.is_trusted("192.0.2.1")


# -- relay decision -------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "user@example.org",
    "User@EXAMPLE.ORG",
    "user@example.org.",
    "user@mail.corp.example.org",
    "user@bücher.example",
    "user@xn--bcher-kva.example",
    "user@BÜCHER.example",
])
def test_relay_domains_accepted_from_anyone(address: str) -> None:
    """A recipient in relay_domains is accepted from an untrusted client, whatever its case or form."""
    assert RelayPolicy(SERVER).check_recipient(UNTRUSTED, "a@b.test", rcpt(address)) is None


@pytest.mark.parametrize("address, route", [
    ("user@elsewhere.test", ()),
    ("user@ELSEWHERE.TEST", ()),
    ("user@elsewhere.test.", ()),
    ("user@corp.example.org", ()),  # ".corp.example.org" matches subdomains only
    ("user@example.org.evil.test", ()),
    ("user@evilexample.org", ()),
    ("user@[192.0.2.1]", ()),
    ("user@[IPv6:2001:db8::1]", ()),
    ("user@elsewhere.test", ("example.org",)),  # route through a relay domain
    ("user%elsewhere.test@example.org", ()),  # percent hack
    ("elsewhere.test!user@example.org", ()),  # bang path
    ('"user@elsewhere.test"@example.org', ()),  # quoted @
    ("user@", ()),
    ("", ()),
])
def test_untrusted_client_cannot_relay(address: str, route: tuple[str, ...]) -> None:
    """An untrusted client gets 554 5.7.1 for any destination outside relay_domains, whatever the form."""
    answer = RelayPolicy(SERVER).check_recipient(UNTRUSTED, "a@b.test", rcpt(address, route))
    assert answer == RELAY_DENIED
    assert (answer.code, answer.status) == (554, "5.7.1")


@pytest.mark.parametrize("path", [
    "<user@Elsewhere.Test>",
    "<@example.org:user@elsewhere.test>",
    "<@example.org,@corp.example.org:user@elsewhere.test>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    '<"user@example.org"@elsewhere.test>',
    "<user%example.org@elsewhere.test>",
])
def test_parsed_paths_from_untrusted_client_denied(path: str) -> None:
    """Whatever path form the parser accepts, an untrusted client cannot reach a foreign domain."""
    parsed = parse_path(path, smtputf8=True)
    recipient = rcpt(parsed.mailbox, parsed.source_route)
    assert RelayPolicy(SERVER).check_recipient(UNTRUSTED, "", recipient) == RELAY_DENIED


def test_source_route_to_relay_domain_accepted() -> None:
    """A source-routed path whose final mailbox is in relay_domains is accepted (the route is not honoured)."""
    parsed = parse_path("<@elsewhere.test:user@example.org>", smtputf8=False)
    recipient = rcpt(parsed.mailbox, parsed.source_route)
    assert RelayPolicy(SERVER).check_recipient(UNTRUSTED, "", recipient) is None


@pytest.mark.parametrize("client", [TRUSTED, AUTHENTICATED])
def test_trusted_and_authenticated_relay_anywhere(client: ClientInfo) -> None:
    """Trusted and authenticated clients may relay to any domain, address literals included."""
    policy = RelayPolicy(SERVER)
    for address in ("user@elsewhere.test", "user@[192.0.2.1]", "user%x@example.org"):
        assert policy.check_recipient(client, "a@b.test", rcpt(address)) is None


def test_no_relay_domains_denies_everything_untrusted() -> None:
    """With no relay_domains an untrusted client can relay nowhere."""
    policy = RelayPolicy(ServerConfig())
    assert policy.check_recipient(UNTRUSTED, "", rcpt("user@example.org")) == RELAY_DENIED


def test_wildcard_relay_domain_is_the_operators_choice() -> None:
    """relay_domains = ["*"] accepts every domain from anyone, as configured."""
    policy = RelayPolicy(ServerConfig(relay_domains=("*",)))
    assert policy.check_recipient(UNTRUSTED, "", rcpt("user@anything.test")) is None


# -- recipient_check -------------------------------------------------------------------


class RecipientCheckTests(SynchronousTestCase):
    """The routing layer's check is consulted after the relay decision."""

    def test_check_reply_returned(self) -> None:
        """A Reply from recipient_check is the answer."""
        calls = []

        def check(client: ClientInfo, sender: str, recipient: Recipient) -> Reply:
            calls.append((client, sender, recipient.address))
            return REJECT

        policy = RelayPolicy(SERVER, recipient_check=check)
        self.assertEqual(policy.check_recipient(TRUSTED, "s@x.test", rcpt("u@blocked.test")), REJECT)
        self.assertEqual(calls, [(TRUSTED, "s@x.test", "u@blocked.test")])

    def test_check_none_accepts(self) -> None:
        """None from recipient_check accepts the recipient."""
        policy = RelayPolicy(SERVER, recipient_check=lambda c, s, r: None)
        self.assertIsNone(policy.check_recipient(TRUSTED, "", rcpt("u@x.test")))

    def test_check_deferred_passed_through(self) -> None:
        """An asynchronous recipient_check answers through its Deferred."""
        d: Deferred = Deferred()
        policy = RelayPolicy(SERVER, recipient_check=lambda c, s, r: d)
        answer = policy.check_recipient(UNTRUSTED, "", rcpt("u@example.org"))
        self.assertNoResult(answer)
        d.callback(REJECT)
        self.assertEqual(self.successResultOf(answer), REJECT)

    def test_check_not_consulted_when_relay_denied(self) -> None:
        """A relay refusal is final: recipient_check is not asked."""
        calls = []
        policy = RelayPolicy(SERVER, recipient_check=lambda c, s, r: calls.append(r) or succeed(None))
        self.assertEqual(policy.check_recipient(UNTRUSTED, "", rcpt("u@elsewhere.test")), RELAY_DENIED)
        self.assertEqual(calls, [])
