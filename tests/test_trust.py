"""Tests for relay.trust: the one PEM certificate loader and the trust root read once."""

from __future__ import annotations

from pathlib import Path

import pytest

from certs import make_certificate
from relay.config import Config, DeliveryConfig
from relay.config_values import ConfigError
from relay.trust import load_trust
from relay.trust import TrustStore, load_certificates, read_certificates


def test_load_certificates_reads_every_certificate_of_a_bundle(tmp_path: Path) -> None:
    """A bundle of two certificates with a key between them gives both certificates, in order."""
    first, key = make_certificate(tmp_path, "a.test")
    second, _ = make_certificate(tmp_path, "b.test")
    bundle = first.read_bytes() + key.read_bytes() + second.read_bytes()
    names = [c.subject.rfc4514_string() for c in load_certificates(bundle)]
    assert names == ["CN=a.test", "CN=b.test"]


def test_read_certificates_without_a_certificate_names_the_file(tmp_path: Path) -> None:
    """A file holding no readable certificate is a ValueError naming the file."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="bad.pem"):
        read_certificates(str(bad))


def test_trust_store_reads_its_file_once(tmp_path: Path) -> None:
    """After load() the trust root is kept: the CA file is not read again, even when it is gone."""
    cert, _ = make_certificate(tmp_path, "ca.test")
    store = TrustStore(str(cert)).load()
    root = store.root()
    cert.unlink()
    assert store.root() is root


def test_load_trust_of_a_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A tls_ca_file whose certificate cannot be read stops start-up with an error naming the key."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = Config(hostname="relay.test", delivery=DeliveryConfig(tls_ca_file=str(bad)), source="r.toml")
    with pytest.raises(ConfigError, match=r"^r\.toml: delivery\.tls_ca_file: .*bad\.pem"):
        load_trust(config)
