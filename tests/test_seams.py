"""Tests for relay.seams: every real provider and every test fake satisfies the seam it stands at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from relay.config import ServerConfig
from relay.dkim import SigningMessage
from relay.policy import RelayPolicy
from relay.queue.store import Spool
from relay.routing.mx import MXResolver
from relay.seams import IncomingMessage, MessageSource, MessageSpool, OutboundConnection, Policy, Resolver
from relay.smtp.client import SMTPClientProtocol
from relay.smtp.transaction import ClientOptions
from test_delivery import FakeConnection, FakeConnector, FakeResolver
from test_delivery import FakeSpool as DeliveryFakeSpool
from test_server import FakeSpool as ServerFakeSpool
from test_server import SlowPolicy


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A real spool running its work at once on the calling thread."""
    real = Spool(str(tmp_path), clock=Clock(), runner=lambda f, *a: maybeDeferred(f, *a))
    real.recover()
    return real


def test_the_real_parts_provide_their_seams(spool: Spool) -> None:
    """Spool, its IncomingMessage, RelayPolicy, MXResolver and the SMTP client satisfy the seams they stand at."""
    assert isinstance(spool, MessageSpool) and isinstance(spool, MessageSource)
    assert isinstance(spool.new_message(), IncomingMessage)
    assert isinstance(RelayPolicy(ServerConfig()), Policy)
    assert isinstance(MXResolver((), clock=Clock()), Resolver)
    assert isinstance(SMTPClientProtocol(ClientOptions("relay.test"), "mx.test", Clock()), OutboundConnection)


def test_the_signing_message_is_an_incoming_message(spool: Spool) -> None:
    """The DKIM-signing wrapper stands where the spool's message does."""
    signing: Any = SigningMessage.__new__(SigningMessage)
    signing.queue_id = "Q1"
    assert isinstance(signing, IncomingMessage)


def test_the_test_fakes_satisfy_the_seams() -> None:
    """The fakes of the server and delivery tests have every method of the part they replace."""
    server_spool = ServerFakeSpool()
    assert isinstance(server_spool, MessageSpool)
    assert isinstance(server_spool.new_message(), IncomingMessage)
    assert isinstance(SlowPolicy(ServerConfig()), Policy)
    assert isinstance(DeliveryFakeSpool(), MessageSource)
    assert isinstance(FakeResolver({}), Resolver)
    assert isinstance(FakeConnection(FakeConnector(), "127.0.0.1", 25, "mx.test", ClientOptions("relay.test")), OutboundConnection)


def test_a_fake_missing_a_method_does_not_pass() -> None:
    """The checks can fail: an object without check_sender is not a Policy, one without quit no connection."""
    class NoSender:
        def is_trusted(self, ip: str) -> bool:
            return False

        def check_recipient(self, *args: Any) -> None:
            return None

    class NoQuit:
        busy = closed = False

        def send(self, transaction: Any) -> Any:
            return None

    assert not isinstance(NoSender(), Policy)
    assert not isinstance(NoQuit(), OutboundConnection)
