"""Tests for relay.dkim: keys, the choice of key by From: domain, signatures dkimpy verifies,
and signing as a message enters the queue through the real SMTP protocol and spool."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dkimkeys import dict_dns, private_pem, records_of, signatures, signing_key, verify_all, write_key
from relay.config import Config, DkimConfig, ServerConfig
from relay.config_values import ConfigError
from relay.dkim import (
    DKIMKeyError,
    Signer,
    SigningSpool,
    from_domain,
    key_from_pem,
    load_key,
    load_keys,
    signing_spool,
)
from relay.policy import RelayPolicy
from relay.queue.store import Spool
from relay.smtp.factory import SMTPServerFactory

MESSAGE = (
    b"Received: from client.test ([192.0.2.7])\r\n\tby relay.test (relay) with ESMTP id X; date\r\n"
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello, Bob.\r\n"
)


@pytest.fixture(scope="module")
def rsa_key():
    return signing_key("example.org", "r2026")


@pytest.fixture(scope="module")
def ed_key():
    return signing_key("example.org", "e2026", "ed25519")


def with_from(value: bytes, message: bytes = MESSAGE) -> bytes:
    return message.replace(b"From: Alice <alice@example.org>\r\n", value)


# -- signatures ------------------------------------------------------------------------


def test_rsa_signature_verifies(rsa_key) -> None:
    """An RSA signature over a matching message verifies with dkimpy against the published key."""
    signed = Signer([rsa_key]).sign(MESSAGE) + MESSAGE
    assert verify_all(signed, dict_dns(records_of(rsa_key))) == [True]


def test_ed25519_signature_verifies(ed_key) -> None:
    """An Ed25519 signature (RFC 8463) verifies with dkimpy against the published key."""
    signed = Signer([ed_key]).sign(MESSAGE) + MESSAGE
    [tags] = signatures(signed)
    assert tags[b"a"] == b"ed25519-sha256"
    assert verify_all(signed, dict_dns(records_of(ed_key))) == [True]


def test_signature_is_relaxed_sha256_with_the_usual_fields_and_from_oversigned(rsa_key) -> None:
    """c=relaxed/relaxed, a=rsa-sha256, the message's usual fields signed, From twice, Received not."""
    [tags] = signatures(Signer([rsa_key]).sign(MESSAGE) + MESSAGE)
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"a"] == b"rsa-sha256"
    assert (tags[b"d"], tags[b"s"]) == (b"example.org", b"r2026")
    signed = [name.strip() for name in tags[b"h"].split(b":")]
    assert signed.count(b"from") == 2
    for name in (b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"):
        assert name in signed
    assert b"received" not in signed


def test_changed_body_does_not_verify(rsa_key) -> None:
    """The check itself can fail: a body changed after signing does not verify."""
    signed = Signer([rsa_key]).sign(MESSAGE) + MESSAGE
    assert verify_all(signed.replace(b"Hello, Bob.", b"Hello, Eve."), dict_dns(records_of(rsa_key))) == [False]


def test_two_keys_of_one_domain_both_sign(rsa_key, ed_key) -> None:
    """Two entries for the same domain (RSA and Ed25519) give two signatures, both valid."""
    signed = Signer([rsa_key, ed_key]).sign(MESSAGE) + MESSAGE
    assert [t[b"s"] for t in signatures(signed)] == [b"r2026", b"e2026"]
    assert verify_all(signed, dict_dns(records_of(rsa_key, ed_key))) == [True, True]


def test_eight_bit_headers_and_body_verify(rsa_key) -> None:
    """UTF-8 in the From: display name, the Subject and the body (SMTPUTF8, 8BITMIME) is signed as is."""
    message = with_from("From: Jörg <jörg@example.org>\r\n".encode()).replace(
        b"Subject: hello", "Subject: grüße".encode()).replace(b"Hello, Bob.", "Grüße, Bob.".encode())
    signed = Signer([rsa_key]).sign(message) + message
    assert verify_all(signed, dict_dns(records_of(rsa_key))) == [True]


def test_openssl_rsa_gives_dkimpys_signature_octets(rsa_key) -> None:
    """RSA signing goes through OpenSSL for loaded keys and yields exactly dkimpy's own octets;
    a key that was not loaded here still uses dkimpy's code."""
    import hashlib

    import dkim
    from dkim.crypto import RSASSA_PKCS1_v1_5_sign as dkimpy_sign, parse_pem_private_key

    from relay.dkim import _openssl_keys, rsa_sign

    Signer([rsa_key])
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsa_sign
    digest = dkim.HashThrough(hashlib.sha256(b"headers to sign"))
    parsed = parse_pem_private_key(rsa_key.secret)
    assert parsed["modulus"] in _openssl_keys
    assert rsa_sign(digest, parsed) == dkimpy_sign(digest, parsed)
    stranger = parse_pem_private_key(private_pem("rsa", 1024))
    assert stranger["modulus"] not in _openssl_keys
    assert rsa_sign(digest, stranger) == dkimpy_sign(digest, stranger)


# -- which key ----------------------------------------------------------------------------


def test_subdomain_of_the_from_domain_is_signed_by_the_parent_entry(rsa_key) -> None:
    """From: a subdomain (mail.example.org) is signed with d= the configured parent (relaxed alignment)."""
    message = with_from(b"From: app@mail.example.org\r\n")
    [tags] = signatures(Signer([rsa_key]).sign(message) + message)
    assert tags[b"d"] == b"example.org"


def test_most_specific_entry_wins(rsa_key) -> None:
    """With entries for example.org and mail.example.org, mail from x.mail.example.org uses the latter."""
    sub = signing_key("mail.example.org", "m1", "ed25519")
    signer = Signer([rsa_key, sub])
    assert signer.keys_for("x.mail.example.org") == (sub,)
    assert signer.keys_for("Example.ORG") == (rsa_key,)
    assert signer.keys_for("other.example.org") == (rsa_key,)


@pytest.mark.parametrize("domain", ["example.net", "notexample.org", "org"])
def test_unmatched_from_domain_is_not_signed(rsa_key, domain: str) -> None:
    """A From: domain that is neither the entry's domain nor below it is sent unsigned."""
    assert Signer([rsa_key]).sign(with_from(f"From: a@{domain}\r\n".encode())) is None


@pytest.mark.parametrize("field, reason", [
    (b"From: a@example.org, b@example.org\r\n", "2 From: addresses"),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n", "2 From: header fields"),
    (b"", "no From: header field"),
    (b"From: undisclosed:;\r\n", "no readable From: address"),
])
def test_several_or_no_from_addresses_are_not_signed(rsa_key, field: bytes, reason: str) -> None:
    """Several From: addresses, several From: fields or none: no signature, and the reason is given."""
    message = with_from(field)
    signer = Signer([rsa_key])
    assert signer.choose(message.partition(b"\r\n\r\n")[0] + b"\r\n").reason == reason
    assert signer.sign(message) is None


def test_folded_from_field_and_idn_domain() -> None:
    """A folded From: field is read whole; a U-label domain is compared in its A-label form."""
    header = "Subject: x\r\nFrom: Someone\r\n <someone@bücher.example>\r\n".encode()
    assert from_domain(header) == ("xn--bcher-kva.example", "")


# -- keys ------------------------------------------------------------------------------------


def test_rsa_and_ed25519_key_files_load(tmp_path: Path) -> None:
    """A 0600 RSA or Ed25519 PEM file loads, with its kind, size and TXT record."""
    rsa_key = load_key(str(write_key(tmp_path / "r.pem")), "example.org", "r")
    assert (rsa_key.kind, rsa_key.bits) == ("rsa", 2048)
    assert rsa_key.txt_record().startswith("v=DKIM1; k=rsa; p=MIIB")
    ed = load_key(str(write_key(tmp_path / "e.pem", "ed25519")), "example.org", "e")
    assert ed.kind == "ed25519" and ed.txt_record().startswith("v=DKIM1; k=ed25519; p=")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A key file that group or others may access is refused, naming the mode."""
    path = write_key(tmp_path / "k.pem", "ed25519", mode=mode)
    with pytest.raises(DKIMKeyError, match=f"mode {mode:04o}"):
        load_key(str(path), "example.org", "s")


def test_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    """A missing key file is refused with the OS error."""
    with pytest.raises(DKIMKeyError, match="cannot read: .*No such file"):
        load_key(str(tmp_path / "missing.pem"), "example.org", "s")


@pytest.mark.parametrize("pem, why", [
    (b"not a key\n", "no readable PEM private key"),
    (None, "holds a key of type EC; DKIM signs with RSA or Ed25519"),
])
def test_wrong_kind_of_key_is_refused(pem: Any, why: str) -> None:
    """Garbage, or a key of another type (EC), is refused."""
    with pytest.raises(DKIMKeyError, match=why):
        key_from_pem(pem if pem is not None else private_pem("ec"), "example.org", "s", "k.pem")


def test_encrypted_key_is_refused() -> None:
    """A passphrase-protected key is refused (the daemon cannot ask for it)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        s.Encoding.PEM, s.PrivateFormat.PKCS8, s.BestAvailableEncryption(b"secret"))
    with pytest.raises(DKIMKeyError, match="encrypted"):
        key_from_pem(pem, "example.org", "s", "k.pem")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a key under 1024 bits")
def test_rsa_key_under_1024_bits_is_refused() -> None:
    """An RSA key of fewer than 1024 bits is refused (RFC 8301)."""
    with pytest.raises(DKIMKeyError, match="768 bits; DKIM needs at least 1024"):
        key_from_pem(private_pem("rsa", 768), "example.org", "s", "k.pem")


def test_load_keys_names_entry_key_and_file(tmp_path: Path) -> None:
    """A bad key is one ConfigError line naming the file, dkim[N].private_key and the key's path."""
    good = write_key(tmp_path / "good.pem", "ed25519")
    bad = write_key(tmp_path / "bad.pem", "ed25519", mode=0o644)
    config = Config(source="relay.toml", dkim=(
        DkimConfig("example.org", "a", str(good), 0), DkimConfig("example.net", "b", str(bad), 1)))
    with pytest.raises(ConfigError) as e:
        load_keys(config)
    assert str(e.value) == (f"relay.toml: dkim[1].private_key: {str(bad)!r}: group or others may access it "
                            "(mode 0644): chmod 600 it")


def test_weak_rsa_key_is_used_with_a_warning(tmp_path: Path) -> None:
    """A 1024-bit RSA key signs, and start-up logs a warning naming it."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        path = write_key(tmp_path / "weak.pem", "rsa", 1024)
        spool = signing_spool(object(), Config(dkim=(DkimConfig("example.org", "w", str(path)),)),
                              lambda f, *a: maybeDeferred(f, *a))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert isinstance(spool, SigningSpool)
    assert [k.bits for k in spool.signer.weak_keys()] == [1024]
    assert any(e.get("log_level").name == "warn" and e.get("path") == str(path) for e in events)


def test_without_dkim_entries_the_spool_is_not_wrapped() -> None:
    """No [[dkim]] entries: the listeners write into the spool itself."""
    spool = object()
    assert signing_spool(spool, Config(), lambda f, *a: maybeDeferred(f, *a)) is spool


# -- through the SMTP protocol into the real spool ----------------------------------------------


class Jobs:
    """A runner that keeps jobs until the test runs them (the signing thread, made explicit)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, tuple, Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((f, args, d))
        return d

    def run(self) -> int:
        count = 0
        while self.waiting:
            f, args, d = self.waiting.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)
            count += 1
        return count


def relay_session(tmp_path: Path, key: Any, jobs: Jobs, **spool_options: Any) -> tuple[Spool, StringTransport, Any]:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = Spool(str(tmp_path), clock=clock, runner=lambda f, *a: maybeDeferred(f, *a), **spool_options)
    spool.recover()
    server = ServerConfig(relay_domains=("example.net",))
    factory = SMTPServerFactory("relay.test", server, SigningSpool(spool, Signer([key]), jobs),
                                RelayPolicy(server), clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
    transport.clear()
    return spool, transport, proto


def stored(spool: Spool) -> bytes:
    [queue_id] = spool.ids()
    with spool.open_message(queue_id) as f:
        return f.read()


CONTENT = MESSAGE.partition(b"\r\n\tby relay.test (relay) with ESMTP id X; date\r\n")[2]


def test_signed_before_the_commit_and_250_after_it(tmp_path: Path, rsa_key) -> None:
    """The queue holds the signed form: the 250 waits for the signature and the commit, and the
    stored bytes (DKIM-Signature first, then our Received header) verify."""
    jobs = Jobs()
    spool, transport, proto = relay_session(tmp_path, rsa_key, jobs)
    for i in range(0, len(CONTENT), 7):  # the header's end arrives split across reads
        proto.dataReceived(CONTENT[i:i + 7])
    proto.dataReceived(b".\r\n")
    assert transport.value() == b"" and spool.ids() == []
    assert jobs.run() == 1
    assert transport.value().startswith(b"250 2.0.0")
    data = stored(spool)
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert data.partition(b"\r\nReceived: from client.test")[1]
    assert data.endswith(CONTENT)
    assert verify_all(data, dict_dns(records_of(rsa_key))) == [True]
    assert spool.load(spool.ids()[0]).size == len(data)


def test_unmatched_message_streams_through_unchanged(tmp_path: Path, rsa_key) -> None:
    """A From: domain without an entry: no signing job, the stored bytes are the received ones."""
    jobs = Jobs()
    spool, transport, proto = relay_session(tmp_path, rsa_key, jobs)
    content = CONTENT.replace(b"alice@example.org", b"alice@example.com")
    proto.dataReceived(content + b".\r\n")
    assert jobs.run() == 0
    assert transport.value().startswith(b"250 2.0.0")
    data = stored(spool)
    assert data.startswith(b"Received: from client.test") and data.endswith(content)
    assert signatures(data) == []


def test_signing_failure_sends_unsigned_and_still_queues(tmp_path: Path, rsa_key) -> None:
    """If signing raises, the message is queued unsigned (250) rather than lost or refused."""
    jobs = Jobs()
    spool, transport, proto = relay_session(tmp_path, rsa_key, jobs)
    proto.factory.spool.signer.sign_with = lambda keys, message: 1 / 0
    proto.dataReceived(CONTENT + b".\r\n")
    jobs.run()
    assert transport.value().startswith(b"250 2.0.0")
    assert signatures(stored(spool)) == []
    assert os.listdir(tmp_path / "tmp") == []


def test_large_message_is_signed_into_its_file(tmp_path: Path, ed_key) -> None:
    """A message over the spool's in-memory limit is signed too, and its file in large/ verifies."""
    jobs = Jobs()
    spool, transport, proto = relay_session(tmp_path, ed_key, jobs, large_message=4096)
    content = CONTENT + b"0123456789abcdef" * 50 + b"\r\n" + b"line of text\r\n" * 2000
    proto.dataReceived(content + b".\r\n")
    assert jobs.run() == 1
    assert transport.value().startswith(b"250 2.0.0")
    assert os.listdir(tmp_path / "large") == [f"{spool.ids()[0]}.msg"]
    data = stored(spool)
    assert data.endswith(content) and verify_all(data, dict_dns(records_of(ed_key))) == [True]


def test_connection_lost_during_data_queues_nothing(tmp_path: Path, rsa_key) -> None:
    """A client gone before the end of DATA leaves nothing queued and nothing to sign."""
    jobs = Jobs()
    spool, transport, proto = relay_session(tmp_path, rsa_key, jobs)
    proto.dataReceived(CONTENT)
    proto.connectionLost(None)
    assert jobs.run() == 0
    assert spool.ids() == []
