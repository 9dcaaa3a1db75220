"""DKIM test helpers: key files, and dkimpy's verifier reading keys from a loopback DNS server.

``write_key`` makes a private key file (mode 0600 unless told otherwise);
``verify_all`` checks every DKIM-Signature of a message with dkimpy, whose
TXT lookups go through dnspython to the test DNS server (``dnsserver.py``)
or to a dict of records for unit tests.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import dkim
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.dkim import SigningKey, key_from_pem

DnsFunc = Callable[..., Optional[bytes]]


def private_pem(kind: str = "rsa", bits: int = 2048) -> bytes:
    """A new unencrypted PKCS#8 PEM key: "rsa" (``bits``), "ed25519" or "ec"; RSA under 1024 bits by openssl."""
    if kind == "rsa" and bits < 1024:  # cryptography refuses to make such keys
        return subprocess.run(["openssl", "genrsa", str(bits)], check=True, capture_output=True).stdout
    if kind == "rsa":
        key: object = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())  # type: ignore[attr-defined]


def write_key(path: Union[str, Path], kind: str = "rsa", bits: int = 2048, mode: int = 0o600) -> Path:
    """Write a new key to ``path`` with ``mode``; returns the path."""
    path = Path(path)
    path.write_bytes(private_pem(kind, bits))
    os.chmod(path, mode)
    return path


def signing_key(domain: str, selector: str, kind: str = "rsa", bits: int = 2048) -> SigningKey:
    """A SigningKey made in memory."""
    return key_from_pem(private_pem(kind, bits), domain, selector, f"<{selector}.{domain}>")


def records_of(*keys: SigningKey) -> dict[str, str]:
    """The TXT records publishing ``keys``, by DNS name."""
    return {key.record_name: key.txt_record() for key in keys}


def dict_dns(records: Mapping[str, str]) -> DnsFunc:
    """A dkimpy ``dnsfunc`` answering from ``records``."""
    def lookup(name: bytes, timeout: float = 5) -> Optional[bytes]:
        value = records.get(name.decode("ascii").rstrip("."))
        return value.encode("ascii") if value is not None else None
    return lookup


def loopback_dns(port: int) -> DnsFunc:
    """A dkimpy ``dnsfunc`` asking the test DNS server on 127.0.0.1:``port`` through dnspython."""
    from relay.routing.dns import make_resolver, resolve_txt

    resolver = make_resolver((("127.0.0.1", port),), timeout=5.0)

    def lookup(name: bytes, timeout: float = 5) -> Optional[bytes]:
        records = resolve_txt(resolver, name.decode("ascii").rstrip("."))
        return records[0].encode("utf-8") if records else None
    return lookup


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature field of ``message``, top first."""
    from dkim.util import parse_tag_value

    checker = dkim.DKIM(message)
    return [parse_tag_value(value) for name, value in checker.headers if name.lower() == b"dkim-signature"]


def verify_all(message: bytes, dnsfunc: DnsFunc) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top first."""
    verdicts = []
    for i in range(len(signatures(message))):
        try:
            verdicts.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts
