"""Tests for relay.config: TOML -> frozen Config, defaults, validation and error lines."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path

import pytest

from relay.config import (
    Config,
    DeliveryConfig,
    QueueConfig,
    RouteConfig,
    ServerConfig,
    apply_overrides,
    config_from_mapping,
    default_hostname,
    load_config,
)
from relay.config_values import ConfigError, domain_pattern_problem, parse_duration, parse_size
from relay.domains import DomainSet

FULL = """
hostname = "relay.example.org"

[server]
listen = ["tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\\\:\\\\:1"]
submission_listen = ["tcp:587"]
trusted_networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
relay_domains = ["example.org", ".example.org", "Bücher.example"]
max_message_size = "10MiB"
max_recipients = 50
tls_certificate = "/etc/relay/cert.pem"
tls_key = "/etc/relay/key.pem"
auth_users = "/etc/relay/users"
idle_timeout = "2m"
max_sessions = 20
max_errors = 3
source_routes = "honor"

[queue]
directory = "/var/spool/relay"
min_retry = "30s"
max_retry = "1h"
max_lifetime = "2d"

[delivery]
port = 2525
nameservers = ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "::1"]
concurrency = 8
per_destination = 2

[[routes]]
domains = ["partner.example", ".corp.example.org"]
smarthost = "mail.corp.example.org:25"
username = "relay"
password_file = "/etc/relay/upstream.secret"
tls = "require"

[[routes]]
domains = ["blocked.example"]
reject = "no mail to this domain"

[[routes]]
domains = ["legacy.example"]
via = ["gw1.example.net:2525", "gw2.example.net"]

[[routes]]
domains = ["lookup.example"]
plugin = "ldap"
server = "ldap://127.0.0.1"
cache = { size = 10 }

[[routes]]
domains = ["*"]
smarthost = ["smtp1.provider.net:587", "[192.0.2.9]:2525", "smtp2.provider.net"]
"""


def parse(text: str, source: str = "relay.toml") -> Config:
    return config_from_mapping(tomllib.loads(text), source)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value)


def test_defaults_match_the_specification() -> None:
    """A config built from nothing carries every default that SPEC section 3 lists."""
    config = config_from_mapping({}, "relay.toml")
    assert config.hostname == default_hostname()
    assert config.server == ServerConfig()
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.server.submission_listen == ()
    assert config.server.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.server.relay_domains == ()
    assert config.server.max_message_size == 35_000_000
    assert (config.server.max_recipients, config.server.max_sessions, config.server.max_errors) == (1000, 1000, 10)
    assert (config.server.tls_certificate, config.server.tls_key, config.server.auth_users) == ("", "", "")
    assert config.server.idle_timeout == 300.0
    assert config.server.source_routes == "ignore"
    assert config.queue == QueueConfig("relay-queue", 300.0, 14400.0, 432000.0)
    assert config.delivery == DeliveryConfig(25, (), 50, 10)
    assert config.routes == ()
    assert config.source == "relay.toml"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """An empty TOML file is a valid configuration equal to the defaults."""
    path = tmp_path / "relay.toml"
    path.write_text("")
    assert load_config(str(path)) == Config(hostname=default_hostname(), source=str(path))


def test_every_key_parses(tmp_path: Path) -> None:
    """A file setting every key of SPEC section 3 yields exactly those values."""
    path = tmp_path / "relay.toml"
    path.write_text(FULL, encoding="utf-8")
    config = load_config(str(path))
    assert config.hostname == "relay.example.org"
    assert config.server == ServerConfig(
        listen=("tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\:\\:1"),
        submission_listen=("tcp:587",),
        trusted_networks=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.0.2.7/32"),
        ),
        relay_domains=("example.org", ".example.org", "Bücher.example"),
        max_message_size=10 * 1024 * 1024,
        max_recipients=50,
        tls_certificate="/etc/relay/cert.pem",
        tls_key="/etc/relay/key.pem",
        auth_users="/etc/relay/users",
        idle_timeout=120.0,
        max_sessions=20,
        max_errors=3,
        source_routes="honor",
    )
    assert config.queue == QueueConfig("/var/spool/relay", 30.0, 3600.0, 172800.0)
    assert config.delivery == DeliveryConfig(
        port=2525,
        nameservers=(("192.0.2.53", 53), ("192.0.2.54", 5353), ("2001:db8::53", 53), ("::1", 53)),
        concurrency=8,
        per_destination=2,
    )
    assert config.routes == (
        RouteConfig(
            domains=("partner.example", ".corp.example.org"),
            smarthost=("mail.corp.example.org:25",),
            username="relay", password_file="/etc/relay/upstream.secret", tls="require", index=0,
        ),
        RouteConfig(domains=("blocked.example",), reject="no mail to this domain", index=1),
        RouteConfig(domains=("legacy.example",), via=("gw1.example.net:2525", "gw2.example.net"), index=2),
        RouteConfig(
            domains=("lookup.example",), plugin="ldap",
            options={"server": "ldap://127.0.0.1", "cache": {"size": 10}}, index=3,
        ),
        RouteConfig(
            domains=("*",),
            smarthost=("smtp1.provider.net:587", "[192.0.2.9]:2525", "smtp2.provider.net"),
            index=4,
        ),
    )


@pytest.mark.parametrize(
    "text, seconds",
    [(30, 30.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0), ("5d", 432000.0), ("45", 45.0)],
)
def test_durations(text: object, seconds: float) -> None:
    """Durations are seconds as numbers, or strings with an s/m/h/d unit."""
    assert parse(f"[queue]\nmin_retry = {text!r}\nmax_retry = '30d'".replace("'", '"')).queue.min_retry == seconds
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text, octets",
    [("10MB", 10_000_000), ("10MiB", 10_485_760), ("1000000", 1_000_000), ("64KiB", 65_536), ("1kb", 1000), (5000, 5000)],
)
def test_sizes(text: object, octets: int) -> None:
    """Sizes are bytes, decimal units (MB = 10**6) or binary units (MiB = 2**20)."""
    value = f'"{text}"' if isinstance(text, str) else str(text)
    assert parse(f"[server]\nmax_message_size = {value}").server.max_message_size == octets
    assert parse_size(text) == octets


@pytest.mark.parametrize("value, workers", [(1, 1), (4, 4), (256, 256)])
def test_workers_is_a_number_of_processes(value: int, workers: int) -> None:
    """[server] workers takes an integer from 1 to 256; without it there is one worker."""
    assert parse(f"[server]\nworkers = {value}").server.workers == workers
    assert parse("").server.workers == 1


@pytest.mark.parametrize("cores, workers", [(6, 6), (None, 1), (1000, 256)])
def test_workers_auto_is_one_per_cpu_core(monkeypatch: pytest.MonkeyPatch, cores: object, workers: int) -> None:
    """workers = "auto" is os.cpu_count(), 1 when the count is unknown, at most 256."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert parse('[server]\nworkers = "auto"').server.workers == workers


@pytest.mark.parametrize("pattern", ["a.test", ".a.test", "*", "Bücher.example", "xn--bcher-kva.example", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_valid_domain_patterns(pattern: str) -> None:
    """Plain domains, leading-dot subdomain patterns, "*", IDNA names and address literals are accepted."""
    assert domain_pattern_problem(pattern) is None
    assert parse(f'[server]\nrelay_domains = ["{pattern}"]').server.relay_domains == (pattern,)


@pytest.mark.parametrize("pattern", ["*.a.test", "a..test", "-a.test", "a test", "..a.test", "[not-an-ip]", "a" * 64 + ".test"])
def test_invalid_domain_patterns(pattern: str) -> None:
    """Wildcards other than "*", empty labels, bad characters and bad literals are refused with the key named."""
    message = error_of(f'[server]\nrelay_domains = ["ok.test", "{pattern}"]')
    assert message.startswith("relay.toml: server.relay_domains[1]: ")


def test_parsed_patterns_match_as_specified() -> None:
    """Route domains from the file keep the SPEC matching: exact, subdomains only, and IDNA-equal."""
    config = parse('[[routes]]\ndomains = ["a.test", ".b.test", "Bücher.example"]\nreject = "no"')
    domains = DomainSet(config.routes[0].domains)
    assert domains.matches("A.TEST") and domains.matches("x.b.test") and domains.matches("xn--bcher-kva.example")
    assert not domains.matches("b.test") and not domains.matches("x.a.test")


BAD = [
    # (TOML, the dotted key the one-line error must name, a word of what is wrong)
    ("colour = 1", "colour", "unknown key"),
    ("[server]\nlisten_on = []", "server.listen_on", "unknown key"),
    ("[queue]\ndir = 'q'", "queue.dir", "unknown key"),
    ("[delivery]\nports = 25", "delivery.ports", "unknown key"),
    ("[[routes]]\ndomains = ['a.test']\nreject = 'no'\nreason = 'x'", "routes[0].reason", "unknown key"),
    ("[[routes]]\ndomains = ['a.test']\nsmarthost = 'h'\nusr = 'x'", "routes[0].usr", "unknown key"),
    ("server = 5", "server", "expected a table"),
    ("hostname = 5", "hostname", "expected a string"),
    ("hostname = 'not a host'", "hostname", "not a valid domain name"),
    ("[server]\nmax_recipients = '10'", "server.max_recipients", "expected an integer"),
    ("[server]\nmax_recipients = true", "server.max_recipients", "expected an integer"),
    ("[server]\nmax_sessions = 0", "server.max_sessions", "out of range"),
    ("[server]\nmax_errors = -1", "server.max_errors", "out of range"),
    ("[server]\nlisten = 'tcp:25'", "server.listen", "expected an array"),
    ("[server]\nlisten = [25]", "server.listen[0]", "expected a string"),
    ("[server]\nidle_timeout = 'soon'", "server.idle_timeout", "not a duration"),
    ("[server]\nidle_timeout = 0", "server.idle_timeout", "positive"),
    ("[queue]\nmax_lifetime = '5 fortnights'", "queue.max_lifetime", "not a duration"),
    ("[queue]\nmin_retry = '1h'\nmax_retry = '5m'", "queue.max_retry", "shorter than queue.min_retry"),
    ("[server]\nmax_message_size = 'lots'", "server.max_message_size", '"lots" is not a size'),
    ("[server]\nmax_message_size = '10XB'", "server.max_message_size", "not a size"),
    ("[server]\nlisten = ['tcp:2525', 'carrier-pigeon:1']", "server.listen[1]", "not a valid endpoint"),
    ("[server]\nlisten = ['tcp:port']", "server.listen[0]", "not a valid endpoint"),
    ("[server]\nlisten = ['tcp:70000']", "server.listen[0]", "out of range"),
    ("[server]\nsubmission_listen = ['tcp:']\nauth_users = 'u'", "server.submission_listen[0]", "not a valid endpoint"),
    ("[server]\nsubmission_listen = ['tcp:587']", "server.submission_listen", "auth_users"),
    ("[server]\ntrusted_networks = ['10.0.0.1/8']", "server.trusted_networks[0]", "host bits set (did you mean 10.0.0.0/8?)"),
    ("[server]\ntrusted_networks = ['10.0.0.0/33']", "server.trusted_networks[0]", "not an IP network"),
    ("[server]\ntrusted_networks = ['localhost']", "server.trusted_networks[0]", "not an IP network"),
    ("[server]\ntls_certificate = 'c.pem'", "server.tls_key", "together with server.tls_certificate"),
    ("[server]\nsource_routes = 'follow'", "server.source_routes", "not one of ignore, honor"),
    ("[server]\nworkers = 0", "server.workers", "0 is out of range (must be from 1 to 256)"),
    ("[server]\nworkers = 257", "server.workers", "257 is out of range (must be from 1 to 256)"),
    ("[server]\nworkers = 'many'", "server.workers", '"many" is not a number of workers or "auto"'),
    ("[server]\nworkers = '4'", "server.workers", '"4" is not a number of workers or "auto"'),
    ("[server]\nworkers = 'Auto'", "server.workers", '"Auto" is not a number of workers or "auto"'),
    ("[server]\nworkers = true", "server.workers", "expected an integer"),
    ("[server]\nworkers = 1.5", "server.workers", "expected an integer"),
    ("[delivery]\nnameservers = ['ns1.example']", "delivery.nameservers[0]", "not a name server"),
    ("[delivery]\nnameservers = ['192.0.2.1:99999']", "delivery.nameservers[0]", "not a name server"),
    ("[delivery]\nport = 0", "delivery.port", "out of range"),
    ("[delivery]\nport = 65536", "delivery.port", "out of range"),
    ("[delivery]\nconcurrency = 0", "delivery.concurrency", "out of range"),
    ("[routes]\ndomains = ['a.test']", "routes", "[[routes]]"),
    ("[[routes]]\ndomains = ['a.test']", "routes[0]", "exactly one of smarthost, via, plugin, reject"),
    ("[[routes]]\ndomains = ['a.test']\nreject = 'no'\nsmarthost = 'h'", "routes[0]", "both smarthost and reject"),
    ("[[routes]]\ndomains = ['a.test']\nvia = ['h']\nplugin = 'p'", "routes[0]", "both via and plugin"),
    ("[[routes]]\nsmarthost = 'h'", "routes[0].domains", "missing"),
    ("[[routes]]\ndomains = []\nsmarthost = 'h'", "routes[0].domains", "empty"),
    ("[[routes]]\ndomains = 'a.test'\nsmarthost = 'h'", "routes[0].domains", "expected an array"),
    ("[[routes]]\ndomains = ['a.test']\nreject = 'no'\n[[routes]]\ndomains = ['b.test']\nsmarthost = 'h:x'", "routes[1].smarthost", "not a number"),
    ("[[routes]]\ndomains = ['a.test']\nsmarthost = []", "routes[0].smarthost", "empty"),
    ("[[routes]]\ndomains = ['a.test']\nsmarthost = ['h', 'bad host']", "routes[0].smarthost[1]", "not a valid domain name"),
    ("[[routes]]\ndomains = ['a.test']\nvia = ['gw1:2525', 'gw2:25']", "routes[0].via[1]", "only possible on the first hop"),
    ("[[routes]]\ndomains = ['a.test']\nvia = 'gw1'", "routes[0].via", "expected an array"),
    ("[[routes]]\ndomains = ['a.test']\nreject = 'no'\ntls = 'require'", "routes[0].tls", "only possible with smarthost or via"),
    ("[[routes]]\ndomains = ['a.test']\nsmarthost = 'h'\ntls = 'always'", "routes[0].tls", "not one of may, require, verify"),
    ("[[routes]]\ndomains = ['a.test']\nsmarthost = 'h'\nusername = 'u'", "routes[0].password_file", "together with routes[0].username"),
    ("[[routes]]\ndomains = ['a.test']\nplugin = ''", "routes[0].plugin", "empty"),
    ("[[routes]]\ndomains = ['a.test']\nreject = ''", "routes[0].reject", "empty"),
    ("routes = [5]", "routes[0]", "expected a table"),
]


@pytest.mark.parametrize("text, key, what", BAD, ids=[f"{key}:{what}" for _, key, what in BAD])
def test_bad_config_names_file_and_key_on_one_line(text: str, key: str, what: str) -> None:
    """Each kind of bad value is a ConfigError whose one line names the file, the dotted key and the problem."""
    message = error_of(text)
    assert "\n" not in message
    assert message.startswith(f"relay.toml: {key}: "), message
    assert what in message, message


def test_plugin_route_passes_its_other_keys_as_options() -> None:
    """A plugin entry keeps every key but domains and plugin as options, unknown ones included."""
    config = parse("[[routes]]\ndomains = ['a.test']\nplugin = 'p'\ntls = 'anything'\nweird = [1, 2]")
    route = config.routes[0]
    assert (route.plugin, dict(route.options), route.index) == ("p", {"tls": "anything", "weird": [1, 2]}, 0)


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is one line: the path, "cannot read" and the OS reason."""
    path = tmp_path / "relay.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: cannot read: [Errno 2] No such file or directory"


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error is one line naming the file and where the syntax broke."""
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nlisten = [\"tcp:25\"\nmax_recipients = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: TOML syntax error: ") and "line" in message and "\n" not in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a one-line error naming the file, not a crash."""
    path = tmp_path / "relay.toml"
    path.write_bytes(b'hostname = "r\xe9lay"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_error_names_the_file_it_was_given(tmp_path: Path) -> None:
    """Errors of a loaded file carry that file's path as given."""
    path = tmp_path / "relay.toml"
    path.write_text("[queue]\nmin_retry = 'never'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f'{path}: queue.min_retry: "never" is not a duration (use e.g. 30s, 5m, 4h, 5d)'


def test_overrides_replace_file_values() -> None:
    """Command-line listen replaces the file's list; queue and hostname replace theirs."""
    config = parse('hostname = "file.example"\n[server]\nlisten = ["tcp:25"]\n[queue]\ndirectory = "q1"')
    merged = apply_overrides(config, listen=["tcp:2500", "tcp:2501"], queue="q2", hostname="cli.example")
    assert merged.server.listen == ("tcp:2500", "tcp:2501")
    assert (merged.queue.directory, merged.hostname) == ("q2", "cli.example")
    assert apply_overrides(config) == config


def test_override_smarthost_appends_a_catch_all() -> None:
    """--smarthost adds a "*" smart host route after the file's routes, so per-domain rules still win."""
    config = parse("[[routes]]\ndomains = ['blocked.example']\nreject = 'no'")
    merged = apply_overrides(config, smarthost="upstream.example:587")
    assert merged.routes == (
        config.routes[0],
        RouteConfig(domains=("*",), smarthost=("upstream.example:587",), index=1),
    )


@pytest.mark.parametrize(
    "kwargs, option",
    [({"listen": ["nonsense:1"]}, "--listen"), ({"hostname": "a b"}, "--hostname"),
     ({"smarthost": "h:port"}, "--smarthost"), ({"queue": ""}, "--queue")],
)
def test_bad_override_names_the_option(kwargs: dict, option: str) -> None:
    """A bad command-line value is a one-line ConfigError naming the option."""
    with pytest.raises(ConfigError) as caught:
        apply_overrides(Config(), **kwargs)
    assert str(caught.value).startswith(f"command line: {option}: ")


def test_server_postmaster_key(tmp_path) -> None:
    """[server] postmaster takes an address; a value that is not one is an error naming file and key."""
    from relay.config import load_config
    from relay.config_values import ConfigError

    good = tmp_path / "good.toml"
    good.write_text('[server]\npostmaster = "admin@ops.example"\n')
    assert load_config(str(good)).server.postmaster == "admin@ops.example"
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\npostmaster = "not an address"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*server\.postmaster"):
        load_config(str(bad))


def test_metrics_and_log_sections() -> None:
    """[metrics] listen takes endpoints (default none); [log] takes a format and a level (default text, info)."""
    default = parse("")
    assert default.metrics.listen == () and (default.log.format, default.log.level) == ("text", "info")
    config = parse('[metrics]\nlisten = ["tcp:9125:interface=127.0.0.1"]\n[log]\nformat = "json"\nlevel = "debug"\n')
    assert config.metrics.listen == ("tcp:9125:interface=127.0.0.1",)
    assert (config.log.format, config.log.level) == ("json", "debug")


@pytest.mark.parametrize("text, key", [
    ('[metrics]\nlisten = "tcp:9125"\n', "metrics.listen"),
    ('[metrics]\nport = 9125\n', "metrics.port"),
    ('[log]\nformat = "yaml"\n', "log.format"),
    ('[log]\nlevel = "verbose"\n', "log.level"),
])
def test_bad_metrics_and_log_keys_name_the_key(text: str, key: str) -> None:
    """A bad [metrics] or [log] value is one line naming the file and the key."""
    assert error_of(text).startswith(f"relay.toml: {key}")
