"""The relay policy: the one place that decides who may send mail to which recipient.

``RelayPolicy.check_recipient`` is asked by the SMTP server for every RCPT.
A recipient whose domain matches ``relay_domains`` is accepted from anyone;
any other domain only from a client in ``trusted_networks`` or an
authenticated one; everyone else gets ``554 5.7.1 Relay access denied``, so
the relay is never open whatever address form a client uses (case, trailing
dot, U-labels, address literals, source routes).

Like Postfix's ``allow_untrusted_routing = no``, an untrusted client may not
hide another destination in the local part of a relayed address
(``user%other@relay.domain``, ``host!user@relay.domain``,
``"user@other"@relay.domain``): a next hop might route on it.

After the relay decision an optional ``recipient_check`` (the routing
layer's reject routes, for instance) is consulted with the same arguments;
it may answer asynchronously.

``RelayPolicy.check_sender`` is asked at MAIL for authenticated clients:
with a ``sender_login_map`` (``relay.auth.SenderLoginMap``) the envelope
sender must be owned by the authenticated user (``553 5.7.1`` otherwise),
like Postfix's ``reject_sender_login_mismatch``; the null sender is allowed.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred

from relay.config import ServerConfig
from relay.domains import DomainSet, ip_literal, normalize_domain
from relay.envelope import ClientInfo, Recipient
from relay.smtp.replies import RELAY_DENIED, SENDER_MAP_UNAVAILABLE, Reply, sender_not_owned


PolicyAnswer = Union[Optional[Reply], "Deferred[Optional[Reply]]"]
RecipientCheck = Callable[[ClientInfo, str, Recipient], PolicyAnswer]

# Characters that carry a routing meaning to some mailers when found in a local part.
_ROUTING_CHARACTERS = ("%", "!", "@")


class RelayPolicy:
    """Decides, per recipient and client, whether the relay accepts the recipient."""

    def __init__(self, server: ServerConfig, recipient_check: Optional[RecipientCheck] = None,
                 sender_logins: Optional[Any] = None) -> None:
        self.relay_domains = DomainSet(server.relay_domains)
        self.trusted_networks = tuple(server.trusted_networks)
        self.recipient_check = recipient_check
        self.sender_logins = sender_logins  # a relay.auth.SenderLoginMap, or None

    def check_sender(self, client: ClientInfo, sender: str) -> PolicyAnswer:
        """None to accept ``sender`` at MAIL, a refusal Reply, or a Deferred firing with either."""
        if self.sender_logins is None or not client.auth_user or not sender:
            return None
        user = client.auth_user

        def judged(owned: Optional[bool]) -> Optional[Reply]:
            if owned is None:
                return SENDER_MAP_UNAVAILABLE
            return None if owned else sender_not_owned(sender, user)

        return self.sender_logins.may_use(user, sender).addCallback(judged)

    def is_trusted(self, ip: str) -> bool:
        """True when ``ip`` lies in a trusted network (IPv4-mapped IPv6 counts as IPv4)."""
        address = _ip_address(ip)
        if address is None:
            return False
        return any(address in network for network in self.trusted_networks)

    def may_relay(self, client: ClientInfo) -> bool:
        """True when the client may send to any domain."""
        return client.trusted or bool(client.auth_user)

    def check_recipient(self, client: ClientInfo, sender: str, recipient: Recipient) -> PolicyAnswer:
        """None to accept ``recipient``, a refusal Reply, or a Deferred firing with either."""
        if not self.may_relay(client):
            if not self._is_relay_domain(recipient.address):
                return RELAY_DENIED
            if _hides_a_route(recipient.address):
                return RELAY_DENIED
        if self.recipient_check is None:
            return None
        return self.recipient_check(client, sender, recipient)

    def _is_relay_domain(self, address: str) -> bool:
        domain = normalize_domain(address.rpartition("@")[2])
        if not domain:
            return False
        return self.relay_domains.matches(domain)


def _hides_a_route(address: str) -> bool:
    local = address.rpartition("@")[0]
    return any(char in local for char in _ROUTING_CHARACTERS)


def _ip_address(ip: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        address = ip_literal(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(str(address).partition("%")[0])
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address
