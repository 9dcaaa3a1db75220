"""Tests for the ``[[dkim]]`` configuration section and the start-up check of its keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkimkeys import write_key
from relay.config import DkimConfig, config_from_mapping, load_config
from relay.config_values import ConfigError
from relay.tap import Options


def parse(dkim: object) -> tuple[DkimConfig, ...]:
    return config_from_mapping({"dkim": dkim}, "relay.toml").dkim


def test_entries_are_read_in_order_with_normalized_domains(tmp_path: Path) -> None:
    """[[dkim]] entries keep their order; domains become lower-case A-labels, selectors lower case."""
    path = tmp_path / "relay.toml"
    path.write_text('[[dkim]]\ndomain = "Example.ORG."\nselector = "S2026"\nprivate_key = "/k/a.pem"\n\n'
                    '[[dkim]]\ndomain = "bücher.example"\nselector = "ed.2026"\nprivate_key = "/k/b.pem"\n')
    assert load_config(str(path)).dkim == (
        DkimConfig("example.org", "s2026", "/k/a.pem", 0),
        DkimConfig("xn--bcher-kva.example", "ed.2026", "/k/b.pem", 1),
    )


def test_no_section_means_no_signing() -> None:
    """Without [[dkim]] there is nothing to sign with."""
    assert config_from_mapping({}, "relay.toml").dkim == ()


@pytest.mark.parametrize("dkim, message", [
    ({"domain": "example.org"}, "relay.toml: dkim: expected an array of tables: write [[dkim]], not [dkim]"),
    ([{"domain": "example.org", "selector": "s"}],
     "relay.toml: dkim[0].private_key: missing: every [[dkim]] entry needs domain, selector and private_key"),
    ([{"domain": "example.org", "selector": "s", "private_key": "/k", "keyfile": "/k"}],
     "relay.toml: dkim[0].keyfile: unknown key (known keys here: domain, selector, private_key)"),
    ([{"domain": "exa mple.org", "selector": "s", "private_key": "/k"}],
     'relay.toml: dkim[0].domain: "exa mple.org" is not a valid domain name'),
    ([{"domain": "example.org", "selector": "s/1", "private_key": "/k"}],
     'relay.toml: dkim[0].selector: "s/1" is not a selector'),
    ([{"domain": "example.org", "selector": "s", "private_key": ""}],
     "relay.toml: dkim[0].private_key: must not be empty"),
    ([{"domain": "example.org", "selector": 7, "private_key": "/k"}],
     "relay.toml: dkim[0].selector: expected a string, got an integer 7"),
    (["example.org"], "relay.toml: dkim[0]: expected a table ([[dkim]] entry), got a string"),
    ([{"domain": "example.org", "selector": "s", "private_key": "/a"},
      {"domain": "EXAMPLE.org", "selector": "S", "private_key": "/b"}],
     'relay.toml: dkim[1].selector: "s" for example.org is already configured in dkim[0]'),
])
def test_bad_entries_name_file_and_key(dkim: object, message: str) -> None:
    """Each mistake in a [[dkim]] entry is one line naming the file and the key."""
    with pytest.raises(ConfigError) as e:
        parse(dkim)
    assert str(e.value).startswith(message)


def options_for(tmp_path: Path, key: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[[dkim]]\ndomain = "example.org"\nselector = "s"\nprivate_key = "{key}"\n')
    return path


def test_start_up_refuses_a_key_others_may_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """twistd relay with a group/world-readable key exits 2 with one line naming the key and the file."""
    key = write_key(tmp_path / "k.pem", "ed25519", mode=0o644)
    path = options_for(tmp_path, key)
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--config", str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err == f"{path}: dkim[0].private_key: {str(key)!r}: group or others may access it (mode 0644): chmod 600 it\n"


def test_start_up_refuses_a_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A key file that cannot be read stops start-up with one line naming it."""
    path = options_for(tmp_path, tmp_path / "none.pem")
    with pytest.raises(SystemExit):
        Options().parseOptions(["--config", str(path)])
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: dkim[0].private_key: ") and "No such file" in err and err.count("\n") == 1


def test_start_up_refuses_a_key_of_the_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An EC key is not a DKIM key: one line, status 2."""
    path = options_for(tmp_path, write_key(tmp_path / "ec.pem", "ec"))
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--config", str(path)])
    assert caught.value.code == 2
    assert "holds a key of type EC" in capsys.readouterr().err


def test_start_up_accepts_good_keys(tmp_path: Path) -> None:
    """A 0600 key passes the start-up check."""
    options = Options()
    options.parseOptions(["--config", str(options_for(tmp_path, write_key(tmp_path / "k.pem", "ed25519")))])
    assert options.config is not None and len(options.config.dkim) == 1


def test_composition_root_gives_listeners_the_signing_spool(tmp_path: Path) -> None:
    """With [[dkim]], the listeners write into a SigningSpool around the spool, and the signing
    thread stops after them (their commits wait for it)."""
    from twisted.internet.testing import MemoryReactorClock

    from relay.config import Config, QueueConfig, ServerConfig
    from relay.dkim import SigningSpool
    from relay.tap import build_relay

    key = write_key(tmp_path / "k.pem", "ed25519")
    config = Config(hostname="relay.test", server=ServerConfig(listen=("tcp:2525",)),
                    queue=QueueConfig(directory=str(tmp_path / "q")),
                    dkim=(DkimConfig("example.org", "s", str(key)),))
    reactor = MemoryReactorClock()
    relay = build_relay(config, reactor)
    names = [service.name for service in relay]
    assert names.index("dkim") < names.index("smtp:tcp:2525")
    [(_, listener)] = relay.listeners
    listener.privilegedStartService()
    [(_, factory, _, _)] = reactor.tcpServers
    assert isinstance(factory.spool, SigningSpool) and factory.spool._spool is relay.spool
    assert [k.record_name for k in factory.spool.signer.keys] == ["s._domainkey.example.org"]
