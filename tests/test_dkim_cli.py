"""Tests for ``relay-dkim``: genkey writes a key and the record to publish; check compares the
configured keys with the records a twisted.names DNS server on loopback serves (read by dnspython)."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

import pytest

from dkimkeys import signing_key, write_key
from dnsserver import start_dns_server
from relay.cli.dkim import run
from relay.dkim import load_key


def relay_dkim(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def published_value(genkey_output: str) -> str:
    """The TXT value from the zone file line genkey prints (its quoted strings joined)."""
    line = next(line for line in genkey_output.splitlines() if " IN TXT " in line)
    return "".join(re.findall(r'"([^"]*)"', line))


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """Keys made by genkey, published (or not, or wrongly) on a loopback DNS server."""
    tmp = tmp_path_factory.mktemp("dkim-cli")
    outputs = {}
    for selector, kind in (("rsa1", "rsa"), ("ed1", "ed25519"), ("wrong", "rsa"), ("absent", "ed25519"),
                           ("revoked", "ed25519")):
        status, out, err = relay_dkim("genkey", "Example.ORG", selector, "--type", kind,
                                      "--out", str(tmp / f"{selector}.pem"))
        assert (status, err) == (0, ""), err
        outputs[selector] = out
    other = signing_key("example.org", "wrong")
    zone = {
        "rsa1._domainkey.example.org": {"TXT": [published_value(outputs["rsa1"])]},
        "ed1._domainkey.example.org": {"TXT": ["some other text", published_value(outputs["ed1"])]},
        "wrong._domainkey.example.org": {"TXT": [other.txt_record()]},
        "revoked._domainkey.example.org": {"TXT": ["v=DKIM1; k=ed25519; p="]},
    }
    port, stop = start_dns_server(zone, tmp)
    request.addfinalizer(stop)
    return {"tmp": tmp, "port": port, "outputs": outputs}


def config_file(world, *selectors: str, nameserver: bool = True) -> Path:
    tmp = world["tmp"]
    text = f'[delivery]\nnameservers = ["127.0.0.1:{world["port"]}"]\n' if nameserver else ""
    for selector in selectors:
        text += f'\n[[dkim]]\ndomain = "example.org"\nselector = "{selector}"\nprivate_key = "{tmp / (selector + ".pem")}"\n'
    path = tmp / f"relay-{'-'.join(selectors) or 'none'}.toml"
    path.write_text(text)
    return path


def test_genkey_writes_a_private_key_file(world) -> None:
    """genkey writes a key only its owner may read, which the daemon loads."""
    path = world["tmp"] / "rsa1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(str(path), "example.org", "rsa1")
    assert (key.kind, key.bits) == ("rsa", 2048)
    assert load_key(str(world["tmp"] / "ed1.pem"), "example.org", "ed1").kind == "ed25519"


def test_genkey_prints_the_record_and_the_config_entry(world) -> None:
    """The output names the record, gives its value (split for a zone file) and the [[dkim]] entry."""
    out = world["outputs"]["rsa1"]
    key = load_key(str(world["tmp"] / "rsa1.pem"), "example.org", "rsa1")
    line = next(line for line in out.splitlines() if " IN TXT " in line)
    assert line.startswith("rsa1._domainkey.example.org. 3600 IN TXT ( ")
    assert all(len(part) <= 255 for part in re.findall(r'"([^"]*)"', line))
    assert published_value(out) == key.txt_record()
    assert f'[[dkim]]\ndomain = "example.org"\nselector = "rsa1"\nprivate_key = "{world["tmp"] / "rsa1.pem"}"\n' in out


def test_genkey_never_overwrites_a_key(world) -> None:
    """An existing file is left alone: status 2 and one line."""
    path = world["tmp"] / "rsa1.pem"
    before = path.read_bytes()
    status, out, err = relay_dkim("genkey", "example.org", "rsa1", "--out", str(path))
    assert status == 2 and out == "" and "exists" in err and err.count("\n") == 1
    assert path.read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["genkey", "exa mple.org", "s"], "relay-dkim: 'exa mple.org' is not a valid domain name"),
    (["genkey", "example.org", "s/1"], "relay-dkim: 's/1' is not a selector"),
    (["genkey", "example.org", "s", "--bits", "512"], "relay-dkim: --bits 512: an RSA key for DKIM has"),
    (["genkey", "example.org", "s", "--type", "dsa"], "relay-dkim: argument --type: invalid choice"),
    (["check"], "relay-dkim: the following arguments are required: --config"),
])
def test_bad_arguments_are_one_line_and_status_2(tmp_path: Path, argv: list[str], message: str) -> None:
    """Bad arguments: status 2, one line on stderr, no key written."""
    status, out, err = relay_dkim(*argv, *(["--out", str(tmp_path / "k.pem")] if argv[0] == "genkey" else []))
    assert status == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "k.pem").exists()


def test_check_confirms_published_rsa_and_ed25519_keys(world) -> None:
    """The genkey/check round trip: published records match their keys, status 0."""
    status, out, err = relay_dkim("check", "--config", str(config_file(world, "rsa1", "ed1")))
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"ok   rsa1._domainkey.example.org: the published rsa key matches {world['tmp'] / 'rsa1.pem'}",
        f"ok   ed1._domainkey.example.org: the published ed25519 key matches {world['tmp'] / 'ed1.pem'}",
    ]


@pytest.mark.parametrize("selector, says", [
    ("wrong", "the published key is not the key in"),
    ("absent", "no DKIM key record found; publish: v=DKIM1; k=ed25519; p="),
    ("revoked", "the published key is revoked (empty p=)"),
])
def test_check_reports_a_missing_or_different_record(world, selector: str, says: str) -> None:
    """A record that is absent, revoked or holds another key is a FAIL line and status 1."""
    status, out, _ = relay_dkim("check", "--config", str(config_file(world, "rsa1", selector)))
    assert status == 1
    lines = out.splitlines()
    assert lines[0].startswith("ok   rsa1.")
    assert lines[1].startswith(f"FAIL {selector}._domainkey.example.org: {says}")


def test_check_nameserver_option_overrides_the_config(world) -> None:
    """--nameserver is asked instead of [delivery] nameservers."""
    path = config_file(world, "ed1", nameserver=False)
    status, out, _ = relay_dkim("check", "--config", str(path), "--nameserver", f"127.0.0.1:{world['port']}")
    assert status == 0 and out.startswith("ok   ed1.")


def test_check_reports_an_unusable_key(world, tmp_path: Path) -> None:
    """A key the daemon would refuse is a FAIL line naming the entry, not a traceback."""
    key = write_key(world["tmp"] / "loose.pem", "ed25519", mode=0o644)
    path = config_file(world, "loose")
    status, out, err = relay_dkim("check", "--config", str(path))
    assert status == 1 and err == ""
    assert out == (f"FAIL loose._domainkey.example.org: dkim[0].private_key {str(key)!r}: "
                   "group or others may access it (mode 0644): chmod 600 it\n")


def test_check_without_entries_and_with_a_bad_config(world, tmp_path: Path) -> None:
    """No [[dkim]] entries: status 1; a bad configuration: status 2 and the loader's line."""
    status, out, _ = relay_dkim("check", "--config", str(config_file(world)))
    assert status == 1 and "no [[dkim]] entries" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[dkim]]\ndomain = "example.org"\n')
    status, _, err = relay_dkim("check", "--config", str(bad))
    assert status == 2 and err.startswith(f"relay-dkim: {bad}: dkim[0].selector: missing")
