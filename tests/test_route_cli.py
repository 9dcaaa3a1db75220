"""Tests for relay.cli.route: the relay-route command, in process and as a process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.cli.route import EXIT_FAILED, EXIT_OK, EXIT_USAGE, parse_address, run
from relay.envelope import Recipient, Route
from relay.routing.dns import ResolutionError
from relay.routing.mx import Target

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dnsserver import dns_server  # noqa: E402

CONFIG = """\
hostname = "relay.test"
[delivery]
port = 2525
nameservers = ["127.0.0.1:5353"]
[[routes]]
domains = ["corp.test"]
smarthost = ["smart1.test:587", "smart2.test"]
[[routes]]
domains = ["blocked.test"]
reject = "no mail to this domain"
[[routes]]
domains = ["legacy.test"]
via = ["gw1.test:26", "gw2.test", "gw3.test"]
"""


class FakeResolver:
    """Answers from a table of host -> targets or error, recording what it was asked."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[Route, int]] = []
        self.stopped = False

    def targets(self, route: Route, default_port: int) -> defer.Deferred:
        self.asked.append((route, default_port))
        found: list[Target] = []
        for hop in route.hosts:
            answer = self.answers[hop.host]
            if isinstance(answer, Exception):
                return defer.fail(answer)
            found.extend(
                Target(t.host, t.address, hop.port or default_port, t.preference) for t in answer
            )
        return defer.succeed(found)

    def stop(self) -> None:
        self.stopped = True


ANSWERS = {
    "example.test": [Target("mx1.example.test", "192.0.2.1", 0, 10), Target("mx2.example.test", "2001:db8::2", 0, 20)],
    "smart1.test": [Target("smart1.test", "192.0.2.11", 0)],
    "smart2.test": [Target("smart2.test", "192.0.2.12", 0)],
    "gw1.test": [Target("gw1.test", "192.0.2.21", 0)],
    "gone.test": ResolutionError("5.1.2", "domain gone.test does not exist"),
    "flaky.test": ResolutionError("4.4.3", "DNS lookup of flaky.test failed: SERVFAIL"),
}


class RouteCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="relay-route-test-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.config = self.directory / "relay.toml"
        self.config.write_text(CONFIG)
        self.resolver = FakeResolver(ANSWERS)
        self.factory_calls: list[tuple] = []

    def factory(self, nameservers: tuple, reactor: Any) -> FakeResolver:
        self.factory_calls.append(nameservers)
        return self.resolver

    def run_command(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(run(Clock(), argv, resolver_factory=self.factory, out=out, err=err))
        return code, out.getvalue(), err.getvalue()

    def test_human_output_for_direct_mx(self) -> None:
        """The human form names the rule, the kind and the hosts in the order tried, with ports."""
        code, out, err = self.run_command("--config", str(self.config), "user@example.test")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual(
            out,
            "user@example.test\n"
            "  rule:   default (direct MX)\n"
            "  kind:   mx\n"
            "  hosts:  1. mx1.example.test (preference 10) 192.0.2.1 port 2525\n"
            "          2. mx2.example.test (preference 20) [2001:db8::2] port 2525\n",
        )

    def test_json_output(self) -> None:
        """--json prints one object per address with rule, kind, rcpt_route, reason, hosts and error."""
        code, out, _ = self.run_command(
            "--config", str(self.config), "--json", "a@corp.test", "b@legacy.test", "c@blocked.test"
        )
        self.assertEqual(code, EXIT_OK)
        smart, legacy, blocked = json.loads(out)
        self.assertEqual(
            smart,
            {
                "address": "a@corp.test",
                "rule": "routes[0]",
                "kind": "smarthost",
                "rcpt_route": [],
                "reason": "",
                "hosts": [
                    {"host": "smart1.test", "address": "192.0.2.11", "port": 587, "preference": 0},
                    {"host": "smart2.test", "address": "192.0.2.12", "port": 2525, "preference": 0},
                ],
                "error": None,
            },
        )
        self.assertEqual((legacy["kind"], legacy["rcpt_route"]), ("source-route", ["gw2.test", "gw3.test"]))
        self.assertEqual(legacy["hosts"][0]["port"], 26)
        self.assertEqual((blocked["kind"], blocked["reason"], blocked["hosts"]), ("reject", "no mail to this domain", []))

    def test_reject_is_not_resolved(self) -> None:
        """A reject route is shown with its 550 reply and nothing is looked up."""
        code, out, _ = self.run_command("--config", str(self.config), "c@blocked.test")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("  kind:   reject\n  reject: 550 5.7.1 no mail to this domain\n", out)
        self.assertEqual(self.resolver.asked, [])

    def test_source_route_shows_rcpt_path(self) -> None:
        """A via route shows the RCPT path that travels to the first hop."""
        _, out, _ = self.run_command("--config", str(self.config), "b@legacy.test")
        self.assertIn("  rcpt:   <@gw2.test,@gw3.test:b@legacy.test>\n", out)
        self.assertIn("1. gw1.test 192.0.2.21 port 26\n", out)

    def test_dns_failures(self) -> None:
        """Permanent and transient DNS failures are shown with their status; exit status 1."""
        code, out, _ = self.run_command("--config", str(self.config), "a@gone.test", "b@flaky.test", "c@example.test")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("  error:  permanent 5.1.2 domain gone.test does not exist\n", out)
        self.assertIn("  error:  transient 4.4.3 DNS lookup of flaky.test failed: SERVFAIL\n", out)
        self.assertEqual(out.count("mx1.example.test"), 1)

    def test_dns_failure_json(self) -> None:
        """In JSON a DNS failure is an error object with permanent, status and text."""
        _, out, _ = self.run_command("--config", str(self.config), "--json", "a@gone.test")
        (report,) = json.loads(out)
        self.assertEqual(report["error"], {"permanent": True, "status": "5.1.2", "text": "domain gone.test does not exist"})
        self.assertEqual(report["hosts"], [])

    def test_nameservers_from_config_or_option(self) -> None:
        """Nameservers come from [delivery] nameservers unless --nameserver is given; the resolver is stopped."""
        self.run_command("--config", str(self.config), "a@example.test")
        self.run_command("--config", str(self.config), "--nameserver", "127.0.0.9", "--nameserver", "[::1]:5300", "a@example.test")
        self.assertEqual(self.factory_calls, [(("127.0.0.1", 5353),), (("127.0.0.9", 53), ("::1", 5300))])
        self.assertTrue(self.resolver.stopped)

    def test_defaults_without_config(self) -> None:
        """Without --config the defaults apply: direct MX on port 25."""
        code, out, _ = self.run_command("user@example.test")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("mx1.example.test (preference 10) 192.0.2.1 port 25\n", out)

    def test_bad_address(self) -> None:
        """A bad address prints one line on stderr naming it, exits 2 and resolves nothing."""
        for address in ("no-at-sign", "a b@example.test", "x@-bad-.test", "<>"):
            code, out, err = self.run_command("--config", str(self.config), "ok@example.test", address)
            self.assertEqual((code, out), (EXIT_USAGE, ""))
            self.assertTrue(err.startswith(f"relay-route: {address!r} is not an address"), err)
            self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.resolver.asked, [])

    def test_bad_config(self) -> None:
        """A bad config file prints one line naming the file and key, exit 2."""
        bad = self.directory / "bad.toml"
        bad.write_text('[delivery]\nport = "twenty-five"\n')
        code, out, err = self.run_command("--config", str(bad), "a@example.test")
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertTrue(err.startswith(f"relay-route: {bad}: delivery.port"), err)
        self.assertEqual(err.count("\n"), 1)

    def test_bad_options(self) -> None:
        """Unknown options, no address, or a bad --nameserver exit 2 with one line."""
        for argv in (("--frobnicate", "a@example.test"), (), ("--nameserver", "dns.test", "a@example.test")):
            code, out, err = self.run_command(*argv)
            self.assertEqual((code, out), (EXIT_USAGE, ""))
            self.assertTrue(err.startswith("relay-route: "))
            self.assertEqual(err.count("\n"), 1)

    def test_router_failure_is_reported(self) -> None:
        """A router that fails is reported as a transient error for that address, not a traceback."""
        from zope.interface import implementer

        from relay.interfaces import IRouter, IRouterFactory

        @implementer(IRouter)
        class Failing:
            def route(self, recipient: Recipient, context: Any) -> None:
                raise RuntimeError("backend down")

        @implementer(IRouterFactory)
        class Factory:
            name = "failing"

            def makeRouter(self, options: dict, domains: Any, config: Any) -> Failing:
                return Failing()

        config = self.directory / "plugin.toml"
        config.write_text('[[routes]]\ndomains = ["*"]\nplugin = "failing"\n')
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["--config", str(config), "a@example.test"], resolver_factory=self.factory,
                plugin_lookup=lambda name: Factory(), out=out, err=err)
        self.assertEqual(self.successResultOf(d), EXIT_FAILED)
        self.assertIn("  error:  transient 4.3.0 router failed: RuntimeError: backend down\n", out.getvalue())
        self.flushLoggedErrors(RuntimeError)


class ParseAddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Bare, bracketed, source-routed, literal and internationalised addresses are understood."""
        self.assertEqual(parse_address("a@b.test"), Recipient("a@b.test"))
        self.assertEqual(parse_address("<a@b.test>"), Recipient("a@b.test"))
        self.assertEqual(parse_address("<@h1.test,@h2.test:a@b.test>"), Recipient("a@b.test", source_route=("h1.test", "h2.test")))
        self.assertEqual(parse_address("a@[IPv6:2001:db8::1]"), Recipient("a@[IPv6:2001:db8::1]"))
        self.assertEqual(parse_address("jürgen@bücher.example"), Recipient("jürgen@bücher.example"))


# -- as a process, against a DNS server on loopback ----------------------------------------

ZONE = {
    "example.test": {"MX": [[20, "mx2.example.test"], [10, "mx1.example.test"]]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "smart.example.test": {"A": ["127.0.0.5"]},
}


def relay_route(*argv: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "relay.cli.route", *argv],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=20,
    )


def test_process_against_loopback_dns(tmp_path: Path) -> None:
    """relay-route as a process resolves MX, null MX, NXDOMAIN and a smart host against a loopback DNS server."""
    with dns_server(ZONE, tmp_path) as port:
        config = tmp_path / "relay.toml"
        config.write_text(
            f'hostname = "relay.test"\n[delivery]\nnameservers = ["127.0.0.1:{port}"]\n'
            '[[routes]]\ndomains = ["corp.test"]\nsmarthost = "smart.example.test:2525"\n'
        )
        result = relay_route(
            "--config", str(config), "--json",
            "a@example.test", "b@nullmx.test", "c@nowhere.test", "d@corp.test",
            cwd=tmp_path,
        )
    assert result.returncode == EXIT_FAILED, result.stderr
    mx, nullmx, nowhere, corp = json.loads(result.stdout)
    assert [(h["host"], h["address"], h["preference"]) for h in mx["hosts"]] == [
        ("mx1.example.test", "127.0.0.2", 10),
        ("mx2.example.test", "127.0.0.3", 20),
        ("mx2.example.test", "::1", 20),
    ]
    assert {h["port"] for h in mx["hosts"]} == {25}
    assert (nullmx["error"]["permanent"], nullmx["error"]["status"]) == (True, "5.1.10")
    assert (nowhere["error"]["permanent"], nowhere["error"]["status"]) == (True, "5.1.2")
    assert corp["rule"] == "routes[0]"
    assert corp["hosts"] == [{"host": "smart.example.test", "address": "127.0.0.5", "port": 2525, "preference": 0}]


def test_process_errors_are_one_line(tmp_path: Path) -> None:
    """As a process, a bad address or config exits 2 with one stderr line and no traceback."""
    result = relay_route("not an address", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[[routes]]\ndomains = ['a.test']\nplugin = 'no-such-plugin'\n")
    result = relay_route("--config", str(bad), "a@a.test", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.startswith(f'relay-route: {bad}: routes[0].plugin: no router plugin named "no-such-plugin"')
    assert result.stderr.count("\n") == 1


def test_process_looks_up_idna_2008_a_label(tmp_path: Path) -> None:
    """relay-route 'user@faß.de' asks the loopback DNS server for xn--fa-hia.de (IDNA 2008), never fass.de."""
    zone = {
        "xn--fa-hia.de": {"MX": [[10, "mx.xn--fa-hia.de"]]},
        "mx.xn--fa-hia.de": {"A": ["127.0.0.7"]},
        "fass.de": {"MX": [[10, "mx.fass.de"]]},
        "mx.fass.de": {"A": ["127.0.0.8"]},
    }
    with dns_server(zone, tmp_path) as port:
        result = relay_route("--nameserver", f"127.0.0.1:{port}", "--json", "user@faß.de", "user@FAß.De",
                             cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    routes = json.loads(result.stdout)
    for route in routes:
        assert [(h["host"], h["address"]) for h in route["hosts"]] == [("mx.xn--fa-hia.de", "127.0.0.7")]


def test_process_refuses_emoji_domain_in_one_line(tmp_path: Path) -> None:
    """relay-route with a domain IDNA 2008 refuses (an emoji) exits 2 with one line naming the reason."""
    result = relay_route("user@\U0001f600.example", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "internationalized domain name" in result.stderr
