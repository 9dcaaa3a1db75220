"""End-to-end relaying over loopback with real peers nobody here wrote.

A twisted.names DNS server on loopback serves the test zone; dnspython in the
relay reads it.  aiosmtpd servers on distinct 127.0.0.x addresses, all on the
same port (set by ``[delivery] port``), are the MX hosts and smart hosts.
The relay is started with ``twistd -n relay``; smtplib submits.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest
from aiosmtpd.smtp import AuthResult

from certs import make_certificate
from dnsserver import start_dns_server
from relay.queue.store import Spool
from relayproc import REPO, RelayProcess, free_port, wait_until
from smtpsink import SMTPSink

EXAMPLES = REPO / "examples"

ZONE = {
    "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "down.test": {"MX": [[10, "mxdown.down.test"], [20, "mx2.example.test"]]},
    "mxdown.down.test": {"A": ["127.0.0.4"]},
    "implicit.test": {"A": ["127.0.0.5"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "slow.test": {"MX": [[10, "mxdown.down.test"]]},
    "chained.test": {"A": ["127.0.0.5"]},
}




def send(port: int, sender: str, recipients: list[str], data: bytes, **mail_options) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example.org")
        s.sendmail(sender, recipients, data, **mail_options)
        reply = s.noop()  # keeps the order simple; the queue id is in the log
    return reply


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """DNS, five downstream servers and two relays; each torn down by PID, even when a later one fails to start."""
    tmp = tmp_path_factory.mktemp("relay-world")
    dns_port, stop_dns = start_dns_server(ZONE, tmp)
    request.addfinalizer(stop_dns)
    port = free_port("127.0.0.2")
    sinks = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.5", "127.0.0.6", "127.0.0.8"):
        sinks[ip] = SMTPSink(ip, port).start()
        request.addfinalizer(sinks[ip].stop)

    # A smart host requiring STARTTLS and AUTH.
    cert, key = make_certificate(tmp, "smarthost.test", ("127.0.0.7",))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login, auth_data.password) == (b"relayuser", b"s3cret pass")
        logins.append((mechanism, auth_data.login, ok))
        return AuthResult(success=ok)

    smarthost = SMTPSink("127.0.0.7", port, tls_context=tls, require_starttls=True,
                         auth_required=True, authenticator=authenticator).start()
    request.addfinalizer(smarthost.stop)
    (tmp / "upstream.secret").write_text("s3cret pass\n")
    (tmp / "transport").write_text("plugged.test  smarthost [127.0.0.8]\n")

    # Relay B: the final hop of a source route; delivers by MX like any relay.
    relay_b = RelayProcess(tmp / "b", f'''
hostname = "relay-b.test"
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]
''')
    request.addfinalizer(relay_b.kill)
    relay_b.start()

    relay_a = RelayProcess(tmp / "a", f'''
hostname = "relay-a.test"
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]

[[routes]]
domains = ["smart.test"]
smarthost = "127.0.0.7"
username = "relayuser"
password_file = "{tmp / 'upstream.secret'}"

[[routes]]
domains = ["legacy.test"]
via = ["127.0.0.6", "gw2.legacy.test"]

[[routes]]
domains = ["chained.test"]
via = ["127.0.0.1:{relay_b.port}", "relay-b.test"]

[[routes]]
domains = ["blocked.test"]
reject = "no mail to this domain"

[[routes]]
domains = ["plugged.test"]
plugin = "transport-map"
map = "{tmp / 'transport'}"
''', extra_path=[str(EXAMPLES)])
    request.addfinalizer(relay_a.kill)
    relay_a.start()
    return {"a": relay_a, "b": relay_b, "sinks": sinks, "smarthost": smarthost, "logins": logins,
            "port": port, "dns_port": dns_port}


def only_message_to(sink: SMTPSink, address: str):
    """Wait (bounded) for the one message carrying ``address`` at ``sink``."""
    def arrived():
        with sink.lock:
            return [m for m in sink.messages if address in m.recipients]
    found = wait_until(arrived, what=f"{address} at {sink.host}")
    assert len(found) == 1, f"{address} delivered {len(found)} times"
    return found[0]


def test_lowest_preference_mx_receives(world):
    """Mail for a domain goes to its MX with the lowest preference value."""
    send(world["a"].port, "s@example.org", ["pref@example.test"], b"Subject: mx\r\n\r\nbody\r\n")
    m = only_message_to(world["sinks"]["127.0.0.2"], "pref@example.test")
    assert m.sender == "s@example.org"
    assert not any("pref@example.test" in x.recipients for x in world["sinks"]["127.0.0.3"].messages)


def test_unreachable_first_mx_falls_back_to_second(world):
    """When the best MX does not answer, the next MX receives the message."""
    send(world["a"].port, "s@example.org", ["fallback@down.test"], b"Subject: fb\r\n\r\nbody\r\n")
    only_message_to(world["sinks"]["127.0.0.3"], "fallback@down.test")


def test_implicit_mx_uses_the_domain_address(world):
    """A domain without MX records receives at its own A record."""
    send(world["a"].port, "s@example.org", ["who@implicit.test"], b"Subject: implicit\r\n\r\nbody\r\n")
    only_message_to(world["sinks"]["127.0.0.5"], "who@implicit.test")


def test_mixed_domains_are_split_into_one_transaction_each(world):
    """A message for two destinations is delivered in two transactions, each with its own recipients."""
    send(world["a"].port, "s@example.org", ["one@example.test", "two@implicit.test"], b"Subject: split\r\n\r\nx\r\n")
    m1 = only_message_to(world["sinks"]["127.0.0.2"], "one@example.test")
    m2 = only_message_to(world["sinks"]["127.0.0.5"], "two@implicit.test")
    assert m1.recipients == ["one@example.test"]
    assert m2.recipients == ["two@implicit.test"]


def test_message_bytes_arrive_intact(world):
    """8-bit bytes, 998-octet lines and '.' lines at 64 KiB boundaries reach the MX unchanged."""
    chunk = 65536
    body = bytearray(b"Subject: bytes\r\n\r\n")
    while len(body) < 3 * chunk:
        pad = chunk - (len(body) % chunk)
        if pad > 3:
            body += b"y" * min(pad - 2, 900) + b"\r\n"
        else:
            body += b".\r\n"
    body += b"\xc3\xa4\xc3\xb6 8-bit \xff\r\n" + b"z" * 996 + b"\r\n..\r\n.\r\n. x\r\n"
    data = bytes(body)
    send(world["a"].port, "s@example.org", ["bytes@example.test"], data, mail_options=["BODY=8BITMIME"])
    m = only_message_to(world["sinks"]["127.0.0.2"], "bytes@example.test")
    assert m.data.endswith(data)
    assert m.data.count(b"Received:") == 1 + data.count(b"Received:")


def test_smart_host_with_starttls_and_auth(world):
    """A per-domain smart host receives over STARTTLS after AUTH with the configured credentials."""
    send(world["a"].port, "s@example.org", ["boss@smart.test"], b"Subject: smart\r\n\r\nbody\r\n")
    only_message_to(world["smarthost"], "boss@smart.test")
    assert any(ok and login == b"relayuser" for _, login, ok in world["logins"])


def test_source_route_reaches_first_hop_with_route_in_rcpt(world):
    """A via route hands the message to the first hop with RCPT TO:<@h2:user@domain>."""
    send(world["a"].port, "s@example.org", ["user@legacy.test"], b"Subject: via\r\n\r\nbody\r\n")
    only_message_to(world["sinks"]["127.0.0.6"], "user@legacy.test")
    assert any("<@gw2.legacy.test:user@legacy.test>" in r for r in world["sinks"]["127.0.0.6"].raw_rcpts)


def test_two_relays_chained_by_source_route_deliver_to_the_final_hop(world):
    """Relay A hands to relay B by source route; B ignores the route and delivers to the final MX."""
    send(world["a"].port, "s@example.org", ["end@chained.test"], b"Subject: chain\r\n\r\nbody\r\n")
    m = only_message_to(world["sinks"]["127.0.0.5"], "end@chained.test")
    header = m.data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    received = [line for line in header.split(b"\r\n") if line.startswith(b"Received:")]
    assert b"by relay-b.test" in received[0]  # B's header on top
    assert b"by relay-a.test" in received[1]


def test_reject_route_refuses_at_rcpt(world):
    """A reject route refuses the recipient at RCPT with 550 5.7.1 and its reason."""
    with smtplib.SMTP("127.0.0.1", world["a"].port, timeout=10) as s:
        s.ehlo("client.example.org")
        s.mail("s@example.org")
        code, text = s.rcpt("x@blocked.test")
    assert code == 550
    assert text.startswith(b"5.7.1") and b"no mail to this domain" in text


def test_plugin_router_decides(world):
    """The example transport-map plugin, enabled by name in [[routes]], routes mail to its host."""
    send(world["a"].port, "s@example.org", ["p@plugged.test"], b"Subject: plugin\r\n\r\nbody\r\n")
    only_message_to(world["sinks"]["127.0.0.8"], "p@plugged.test")


def test_null_mx_and_nxdomain_fail_permanently(world):
    """Null MX and a nonexistent domain are permanent failures; a temporary one stays pending."""
    send(world["a"].port, "s@example.org", ["n@nullmx.test", "x@nxdomain.test", "t@slow.test"],
         b"Subject: perm\r\n\r\nbody\r\n")
    spool = Spool(str(world["a"].queue_dir))

    def settled():
        for qid in spool.ids():
            try:
                env = spool.load(qid)
            except KeyError:
                continue
            states = {r.address: r for r in env.recipients}
            if "n@nullmx.test" in states and all(r.attempts for r in env.recipients):
                return states
        return None

    states = wait_until(settled, what="the first attempt of the message")
    assert states["n@nullmx.test"].status == "failed" and "5.1.10" in states["n@nullmx.test"].last_error
    assert states["x@nxdomain.test"].status == "failed" and "5.1.2" in states["x@nxdomain.test"].last_error
    assert states["t@slow.test"].status == "pending" and states["t@slow.test"].last_error
