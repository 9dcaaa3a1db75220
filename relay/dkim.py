"""DKIM signing (RFC 6376; Ed25519 keys per RFC 8463) of mail as it enters the queue.

This module owns the signing keys (loaded and checked at start-up), the
choice of key for a message (the From: domain, aligned: the ``[[dkim]]``
entry with the most specific domain that is the From: domain or one of its
parents), and the signature itself, made by dkimpy: relaxed/relaxed,
sha256, the header fields RFC 6376 recommends (From, Sender, Reply-To,
Subject, Date, Message-ID, To, Cc, MIME fields, In-Reply-To, References,
List-*) that the message has, From signed once more than it occurs so no
From: can be added.  Trace fields (Received, Return-Path) are not signed:
later hops add to them.

Signing happens once, as a message enters the queue: ``SigningSpool`` wraps
the spool for the SMTP listeners, and ``SigningMessage`` holds back the
bytes of a message that will be signed (known once its header block is in)
until the end of DATA, signs them in a thread and writes the
DKIM-Signature field above everything else (our Received header included)
before the commit.  The queue therefore stores the signed form, and every
attempt and every destination sends the same bytes.  A message that will
not be signed streams through unchanged.  The commit, and so the 250,
follow the signature.  RSA signatures are computed by OpenSSL (see
``rsa_sign``).
"""

from __future__ import annotations

import base64
import email.utils
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relay.config import COMMAND_LINE, Config
from relay.config_values import ConfigError
from relay.domains import normalize_domain
from relay.log import Logger

log = Logger()

RSA, ED25519 = "rsa", "ed25519"
MIN_RSA_BITS = 1024  # smaller keys are refused (RFC 8301)
WEAK_RSA_BITS = 2048  # smaller keys are used, with a warning
CANONICALIZATION = (b"relaxed", b"relaxed")
HEADER_LIMIT = 1024 * 1024  # octets of header block looked at; a longer one is not signed

Runner = Callable[..., Deferred]


class DKIMKeyError(Exception):
    """A key file that cannot be used; ``str(error)`` says why."""


# -- keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One ``[[dkim]]`` entry with its key, ready to sign."""

    domain: str  # d=, lower-case A-labels
    selector: str  # s=
    path: str  # where the key came from
    kind: str  # RSA or ED25519
    bits: int  # RSA modulus size; 256 for Ed25519
    secret: bytes  # the private key as dkimpy takes it (PKCS#1 PEM, or the base64 Ed25519 seed)
    public: bytes  # the p= value: base64 of the DER SubjectPublicKeyInfo (RSA) or the raw key (Ed25519)
    private: Any = field(default=None, compare=False)  # the cryptography key object

    @property
    def algorithm(self) -> bytes:
        return b"ed25519-sha256" if self.kind == ED25519 else b"rsa-sha256"

    @property
    def record_name(self) -> str:
        """The DNS name of the selector record."""
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_record(self) -> str:
        """The TXT record value to publish for this key."""
        return f"v=DKIM1; k={self.kind}; p={self.public.decode('ascii')}"

    def __repr__(self) -> str:  # never show the secret
        return f"SigningKey({self.record_name}, {self.kind} {self.bits} bits, {self.path})"


def public_value(key: Any) -> bytes:
    """The base64 p= value of a cryptography private or public key (RSA or Ed25519)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    else:
        raw = public.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw)


def key_from_pem(pem: bytes, domain: str, selector: str, path: str) -> SigningKey:
    """A SigningKey from PEM bytes; DKIMKeyError when they hold no usable key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        key = s.load_pem_private_key(pem, password=None)
    except TypeError:
        raise DKIMKeyError("the key is encrypted (it must not be)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DKIMKeyError("holds no readable PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DKIMKeyError(f"the RSA key has {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS}")
        secret = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())
        return SigningKey(domain, selector, path, RSA, key.key_size, secret, public_value(key), key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
        return SigningKey(domain, selector, path, ED25519, 256, base64.b64encode(seed), public_value(key), key)
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
    raise DKIMKeyError(f"holds a key of type {kind}; DKIM signs with RSA or Ed25519")


def load_key(path: str, domain: str, selector: str) -> SigningKey:
    """Read and check the key file: readable, private to its owner, RSA >= 1024 bits or Ed25519."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            pem = f.read(1024 * 1024)
    except OSError as e:
        raise DKIMKeyError(f"cannot read: [Errno {e.errno}] {e.strerror}" if e.strerror else f"cannot read: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DKIMKeyError(f"group or others may access it (mode {stat.S_IMODE(mode):04o}): chmod 600 it")
    return key_from_pem(pem, domain, selector, path)


def load_keys(config: Config) -> tuple[SigningKey, ...]:
    """Every ``[[dkim]]`` key; the first problem is a ConfigError naming the entry, its key and file."""
    source = config.source or COMMAND_LINE
    keys = []
    for entry in config.dkim:
        try:
            keys.append(load_key(entry.private_key, entry.domain, entry.selector))
        except DKIMKeyError as e:
            raise ConfigError(f"{source}: dkim[{entry.index}].private_key: {entry.private_key!r}: {e}") from None
    return tuple(keys)


# -- choosing and signing ---------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """Which keys sign a message, or why none does (``reason`` "" when no entry matches)."""

    keys: tuple[SigningKey, ...] = ()
    reason: str = ""
    from_domain: str = ""


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) fields of a header block, folded lines joined to their field."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.strip(), value))
    return fields


def from_domain(header: bytes) -> tuple[str, str]:
    """``(domain, "")`` of the one From: address, or ``("", why not)``."""
    values = [value for name, value in header_fields(header) if name.lower() == b"from"]
    if not values:
        return "", "no From: header field"
    if len(values) > 1:
        return "", f"{len(values)} From: header fields"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [address for _, address in email.utils.getaddresses([text]) if address]
    if len(addresses) != 1:
        return "", f"{len(addresses)} From: addresses" if addresses else "no readable From: address"
    local, at, domain = addresses[0].rpartition("@")
    if not at or not local or not domain:
        return "", f"From: address {addresses[0]!r} has no domain"
    return normalize_domain(domain), ""


class Signer:
    """Signs messages with the configured keys: ``sign(message) -> header bytes or None``."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self.keys = tuple(keys)
        self._by_domain: dict[str, tuple[SigningKey, ...]] = {}
        for key in self.keys:
            self._by_domain[key.domain] = self._by_domain.get(key.domain, ()) + (key,)
            if key.kind == RSA and key.private is not None:
                _rsa_through_openssl(key.private)

    @classmethod
    def from_config(cls, config: Config) -> "Signer":
        """The signer of ``config``'s ``[[dkim]]`` entries; ConfigError for a bad key."""
        return cls(load_keys(config))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def weak_keys(self) -> tuple[SigningKey, ...]:
        """The RSA keys under WEAK_RSA_BITS (used, with a warning)."""
        return tuple(k for k in self.keys if k.kind == RSA and k.bits < WEAK_RSA_BITS)

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys of the most specific entry whose domain is ``domain`` or a parent of it."""
        labels = normalize_domain(domain).split(".")
        for start in range(len(labels)):
            keys = self._by_domain.get(".".join(labels[start:]))
            if keys:
                return keys
        return ()

    def choose(self, header: bytes) -> Choice:
        """Which keys sign a message with this header block."""
        domain, problem = from_domain(header)
        if problem:
            return Choice(reason=problem)
        return Choice(keys=self.keys_for(domain), from_domain=domain)

    def sign_with(self, keys: Sequence[SigningKey], message: bytes) -> bytes:
        """The DKIM-Signature fields (CRLF-terminated, one per key) for ``message``; dkimpy errors pass through."""
        import dkim

        fields = []
        for key in keys:
            signer = dkim.DKIM(message, signature_algorithm=key.algorithm, linesep=b"\r\n")
            fields.append(signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"), key.secret,
                                      canonicalize=CANONICALIZATION))
        return b"".join(fields)

    def sign(self, message: bytes) -> Optional[bytes]:
        """The DKIM-Signature fields for ``message``, or None when no entry signs it."""
        end = message.find(b"\r\n\r\n")
        choice = self.choose(message if end < 0 else message[:end + 2])
        return self.sign_with(choice.keys, message) if choice.keys else None


# -- RSA through OpenSSL ----------------------------------------------------------
#
# dkimpy computes the RSA signature itself, in pure Python (several ms for
# 2048 bits, holding the GIL for each big-number step).  RSASSA-PKCS1-v1_5
# is deterministic, so OpenSSL's signature (through cryptography) is the
# same octets, about ten times sooner: dkimpy's primitive is replaced by one
# that uses OpenSSL for the keys loaded here and hands any other key, or
# another hash, back to dkimpy's own code.

_openssl_keys: dict[int, Any] = {}  # RSA modulus -> cryptography private key
_dkimpy_rsa_sign: Optional[Callable[..., bytes]] = None


def _rsa_through_openssl(private: Any) -> None:
    """Sign with ``private`` through OpenSSL from now on (installs the primitive once)."""
    global _dkimpy_rsa_sign
    import dkim

    original = getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)
    if not callable(original):  # another dkimpy: keep its own code
        return
    _openssl_keys[private.private_numbers().public_numbers.n] = private
    if original is not rsa_sign:
        _dkimpy_rsa_sign = original
        dkim.RSASSA_PKCS1_v1_5_sign = rsa_sign


def rsa_sign(hash: Any, private_key: dict) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, key dict)``, through OpenSSL for our keys and sha256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    key = _openssl_keys.get(private_key.get("modulus", 0))
    if key is None or getattr(hash, "name", "").lower() != "sha256":
        assert _dkimpy_rsa_sign is not None
        return _dkimpy_rsa_sign(hash, private_key)
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# -- the hook where messages enter the queue --------------------------------------


class SigningMessage:
    """An incoming message that is signed (when its From: matches) before its commit.

    Same interface as the spool's IncomingMessage (``queue_id``, ``write``,
    ``commit``, ``abort``), which it writes into.
    """

    def __init__(self, inner: Any, signer: Signer, runner: Runner) -> None:
        self.inner = inner
        self.queue_id: str = inner.queue_id
        self._signer = signer
        self._runner = runner
        self._held: list[bytes] = []
        self._held_size = 0
        self._scanned = 0  # octets of the held bytes searched for the end of the header
        self._state = "header"  # header -> holding (will be signed) | passing; aborted
        self._keys: tuple[SigningKey, ...] = ()

    @property
    def size(self) -> int:
        return self.inner.size + self._held_size

    def write(self, data: bytes) -> None:
        """Append ``data``; held back only while it may still be signed."""
        if self._state == "passing":
            self.inner.write(data)
            return
        if self._state == "aborted":
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        self._held.append(data)
        self._held_size += len(data)
        if self._state == "header":
            self._look_for_header_end()

    def _look_for_header_end(self) -> None:
        start = max(0, self._scanned - 3)
        held = b"".join(self._held)
        self._held = [held]
        end = held.find(b"\r\n\r\n", start)
        if end >= 0:
            self._decide(held[:end + 2])
        elif self._held_size > HEADER_LIMIT:
            log.warn("{queue_id}: not signed: header block over {limit} octets", queue_id=self.queue_id,
                     limit=HEADER_LIMIT)
            self._pass_through()
        else:
            self._scanned = len(held)

    def _decide(self, header: bytes) -> None:
        choice = self._signer.choose(header)
        if choice.keys:
            self._keys = choice.keys
            self._state = "holding"
            return
        if choice.reason:
            log.info("{queue_id}: not signed: {reason}", queue_id=self.queue_id, reason=choice.reason)
        else:
            log.debug("{queue_id}: not signed: no [[dkim]] entry for {domain}", queue_id=self.queue_id,
                      domain=choice.from_domain)
        self._pass_through()

    def _pass_through(self) -> None:
        self._state = "passing"
        held, self._held, self._held_size = b"".join(self._held), [], 0
        if held:
            self.inner.write(held)

    def commit(self, envelope: Any) -> Deferred:
        """Sign (when due) in a thread, write the signature and the message, commit; fires with the queue id."""
        if self._state == "header":
            self._decide(b"".join(self._held))
        if self._state != "holding":
            return self.inner.commit(envelope)
        message, self._held, self._held_size = b"".join(self._held), [], 0
        self._state = "signing"
        d = self._runner(self._signer.sign_with, self._keys, message)
        d.addErrback(self._sign_failed)
        d.addCallback(self._write_and_commit, message, envelope)
        return d

    def _sign_failed(self, failure: Failure) -> bytes:
        log.failure("{queue_id}: DKIM signing failed; the message is sent unsigned", failure,
                    queue_id=self.queue_id)
        return b""

    def _write_and_commit(self, signature: bytes, message: bytes, envelope: Any) -> Deferred:
        if self._state == "aborted":
            return defer.fail(ValueError(f"message {self.queue_id} was aborted while being signed"))
        if signature:
            log.info("{queue_id}: signed {signatures}", queue_id=self.queue_id,
                     signatures=", ".join(f"d={k.domain} s={k.selector} ({k.kind})" for k in self._keys))
            self.inner.write(signature)
        self.inner.write(message)
        return self.inner.commit(envelope)

    def abort(self) -> None:
        """Forget the message; idempotent."""
        self._held, self._held_size = [], 0
        self._state = "aborted"
        self.inner.abort()


class SigningSpool:
    """The spool as the SMTP listeners see it: new messages are signed before they are committed."""

    def __init__(self, spool: Any, signer: Signer, runner: Runner) -> None:
        self._spool = spool
        self.signer = signer
        self._runner = runner

    def new_message(self) -> SigningMessage:
        return SigningMessage(self._spool.new_message(), self.signer, self._runner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


class SigningThread:
    """A runner for signing jobs: one at a time, in one thread of their own.

    Signing is CPU work in Python (dkimpy's canonicalisation): more threads
    would not sign faster under the GIL, but each would compete with the
    reactor thread for it.  With one, the reactor waits at most about a
    switch interval for its turn.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool: Any = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="relay-dkim")
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def close(self) -> None:
        """Stop the thread (after the job it is running)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()


def signing_spool(spool: Any, config: Config, runner: Runner) -> Any:
    """``spool`` wrapped for signing with ``config``'s keys, or ``spool`` itself without ``[[dkim]]``."""
    signer = Signer.from_config(config)
    if not signer:
        return spool
    for key in signer.weak_keys():
        log.warn("dkim: the {bits}-bit RSA key {path} ({name}) is weak: use 2048 bits or more",
                 bits=key.bits, path=key.path, name=key.record_name)
    for key in signer.keys:
        log.info("dkim: signing mail from {domain} and its subdomains with {name} ({kind} {bits} bits)",
                 domain=key.domain, name=key.record_name, kind=key.kind, bits=key.bits)
    return SigningSpool(spool, signer, runner)


__all__ = ["Choice", "DKIMKeyError", "SigningKey", "SigningMessage", "SigningSpool", "SigningThread", "Signer",
           "key_from_pem", "load_key", "load_keys", "public_value", "signing_spool"]
