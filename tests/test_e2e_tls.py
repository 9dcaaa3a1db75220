"""End-to-end outbound TLS: route TLS policies and MTA-STS, with real processes and sockets.

A twisted.names DNS server on loopback serves the test zone (TXT records
included); aiosmtpd servers on distinct 127.0.0.x addresses are the smart
hosts and MX hosts, some offering STARTTLS with certificates made here; an
HTTPS server (Python's http.server with ssl, in a thread) serves an MTA-STS
policy on 127.0.0.26:443.  The relay runs as ``twistd -n relay`` with
``[delivery] tls_ca_file`` naming a bundle of the test certificates.
"""

from __future__ import annotations

import http.server
import os
import smtplib
import ssl
import threading
from pathlib import Path
from typing import Optional

import pytest

from certs import make_certificate
from dnsserver import start_dns_server
from relay.envelope import Recipient
from relay.queue.store import Spool
from relayproc import RelayProcess, free_port, wait_until
from smtpsink import SMTPSink

MTA_STS_ADDRESS = "127.0.0.26"
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx2.sts.test\r\nmax_age: 86400\r\n"

ZONE = {
    "smart.tls.test": {"A": ["127.0.0.21"]},
    "bad.tls.test": {"A": ["127.0.0.22"]},
    "clear.tls.test": {"A": ["127.0.0.23"]},
    "untrusted.tls.test": {"A": ["127.0.0.27"]},
    "nosan.tls.test": {"A": ["127.0.0.28"]},
    "sts.test": {"MX": [[10, "mx1.sts.test"], [20, "mx2.sts.test"]]},
    "mx1.sts.test": {"A": ["127.0.0.24"]},
    "mx2.sts.test": {"A": ["127.0.0.25"]},
    "_mta-sts.sts.test": {"TXT": ["v=STSv1; id=20240101T000000"]},
    "mta-sts.sts.test": {"A": [MTA_STS_ADDRESS]},
}




def send(port: int, recipient: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("s@example.org", [recipient], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def tls_sink(address: str, port: int, cert: Path, key: Path) -> SMTPSink:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return SMTPSink(address, port, tls_context=context, require_starttls=True).start()


class PolicyServer:
    """An HTTPS server on ``address``:443 serving one MTA-STS policy; records the paths asked."""

    def __init__(self, address: str, cert: Path, key: Path, policy: bytes) -> None:
        requests: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append((self.headers.get("Host", ""), self.path))
                found = self.path == "/.well-known/mta-sts.txt"
                body = policy if found else b"not found\n"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.requests = requests
        self.server = http.server.ThreadingHTTPServer((address, 443), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_policy_server(tmp: Path, ca_certs: list[Path]) -> tuple[Optional[PolicyServer], str]:
    """The MTA-STS HTTPS server when port 443 can be bound (root), else None and why not."""
    cert, key = make_certificate(tmp, "mta-sts.sts.test")
    ca_certs.append(cert)
    if os.geteuid() != 0:
        return None, "binding port 443 needs root"
    try:
        return PolicyServer(MTA_STS_ADDRESS, cert, key, POLICY), ""
    except OSError as e:
        return None, f"cannot bind {MTA_STS_ADDRESS}:443: {e.strerror}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DNS, TLS and clear sinks, the policy server and one relay; torn down by PID at the end."""
    tmp = tmp_path_factory.mktemp("relay-tls")
    dns_port, stop_dns = start_dns_server(ZONE, tmp)
    port = free_port("127.0.0.21")
    trusted: list[Path] = []
    sinks: dict[str, SMTPSink] = {}
    policy_server: Optional[PolicyServer] = None
    relay: Optional[RelayProcess] = None
    try:
        for address, name, in_bundle, san in (
            ("127.0.0.21", "smart.tls.test", True, True),
            ("127.0.0.22", "wrong-name.tls.test", True, True),
            ("127.0.0.27", "untrusted.tls.test", False, True),
            ("127.0.0.28", "nosan.tls.test", True, False),  # trusted, its name only in the common name
            ("127.0.0.24", "mx1.sts.test", True, True),
            ("127.0.0.25", "mx2.sts.test", True, True),
        ):
            cert, key = make_certificate(tmp, name, subject_alt_name=san)
            if in_bundle:
                trusted.append(cert)
            sinks[address] = tls_sink(address, port, cert, key)
        sinks["127.0.0.23"] = SMTPSink("127.0.0.23", port).start()  # no STARTTLS
        policy_server, why_no_policy = start_policy_server(tmp, trusted)
        ca_file = tmp / "ca.pem"
        ca_file.write_bytes(b"".join(c.read_bytes() for c in trusted))
        relay = RelayProcess(tmp / "relay", f'''
hostname = "relay.tls.test"
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]
tls_ca_file = "{ca_file}"
mta_sts = true

[[routes]]
domains = ["good.test"]
smarthost = "smart.tls.test"
tls = "verify"

[[routes]]
domains = ["bad.test"]
smarthost = "bad.tls.test"
tls = "verify"

[[routes]]
domains = ["untrusted.test"]
smarthost = "untrusted.tls.test"
tls = "verify"

[[routes]]
domains = ["nosan.test"]
smarthost = "nosan.tls.test"
tls = "verify"

[[routes]]
domains = ["clear.test"]
smarthost = "clear.tls.test"
tls = "require"
''').start()
        yield {"relay": relay, "sinks": sinks, "policy_server": policy_server, "why_no_policy": why_no_policy}
    finally:
        if relay is not None:
            relay.kill()
        if policy_server is not None:
            policy_server.stop()
        for sink in sinks.values():
            sink.stop()
        stop_dns()


def first_attempt_of(relay: RelayProcess, address: str) -> Recipient:
    """Wait (bounded) until ``address`` has been attempted once; its stored state."""
    spool = Spool(str(relay.queue_dir))

    def attempted() -> Optional[Recipient]:
        for queue_id in spool.ids():
            try:
                envelope = spool.load(queue_id)
            except KeyError:
                continue
            for recipient in envelope.recipients:
                if recipient.address == address and recipient.attempts:
                    return recipient
        return None

    return wait_until(attempted, what=f"the first attempt for {address}")


def received_by(sink: SMTPSink, address: str) -> list:
    with sink.lock:
        return [m for m in sink.messages if address in m.recipients]


def delivery_line(relay: RelayProcess, address: str) -> str:
    """Wait (bounded) for the delivery log line of ``address``; return it."""
    def line() -> str:
        return next((l for l in relay.log().splitlines() if f"to=<{address}>" in l and " delivered: " in l), "")

    return wait_until(line, what=f"the delivery log line of {address}")


def test_verify_refuses_a_certificate_for_another_name(world):
    """tls=verify to a smart host whose certificate names another host: nothing sent, queued with the reason."""
    send(world["relay"].port, "u@bad.test", "name mismatch")
    recipient = first_attempt_of(world["relay"], "u@bad.test")
    assert recipient.status == "pending"
    assert "certificate does not match the name bad.tls.test" in recipient.last_error
    assert recipient.history[-1].outcome == "transient"
    assert received_by(world["sinks"]["127.0.0.22"], "u@bad.test") == []


def test_verify_refuses_an_untrusted_certificate(world):
    """tls=verify to a smart host whose certificate no configured CA vouches for: queued, named as untrusted."""
    send(world["relay"].port, "u@untrusted.test", "untrusted")
    recipient = first_attempt_of(world["relay"], "u@untrusted.test")
    assert recipient.status == "pending"
    assert "certificate is not trusted" in recipient.last_error
    assert received_by(world["sinks"]["127.0.0.27"], "u@untrusted.test") == []


def test_verify_with_the_configured_ca_delivers_over_tls(world):
    """tls=verify with tls_ca_file and a matching name: delivered, and the log names the TLS version."""
    send(world["relay"].port, "u@good.test", "verified")
    sink = world["sinks"]["127.0.0.21"]
    wait_until(lambda: received_by(sink, "u@good.test"), what="the verified delivery")
    line = delivery_line(world["relay"], "u@good.test")
    assert "host=smart.tls.test[127.0.0.21]" in line
    assert "tls=(TLSv1." in line


def test_verify_refuses_a_certificate_without_subject_alt_name(world):
    """tls=verify to a trusted certificate naming the host only in its CN: refused, typed, one clear line, no traceback."""
    send(world["relay"].port, "u@nosan.test", "no subjectAltName")
    recipient = first_attempt_of(world["relay"], "u@nosan.test")
    assert recipient.status == "pending"
    attempt = recipient.history[-1]
    assert (attempt.outcome, attempt.reason, attempt.remote) == ("transient", "tls-name", False)
    assert "certificate does not match the name nosan.tls.test" in attempt.text
    assert received_by(world["sinks"]["127.0.0.28"], "u@nosan.test") == []
    log = world["relay"].log()
    client_lines = [l for l in log.splitlines() if "nosan.tls.test: TLS: certificate verification failed" in l]
    assert len(client_lines) == recipient.attempts, log[-3000:]
    assert "Traceback" not in log and "while verifying certificate" not in log and "[critical]" not in log.lower()


def test_require_without_starttls_stays_queued(world):
    """tls=require to a host that offers no STARTTLS: nothing sent in clear, the recipient stays queued."""
    send(world["relay"].port, "u@clear.test", "no starttls")
    recipient = first_attempt_of(world["relay"], "u@clear.test")
    assert recipient.status == "pending"
    assert "does not offer STARTTLS" in recipient.last_error
    assert received_by(world["sinks"]["127.0.0.23"], "u@clear.test") == []


def test_mta_sts_enforce_uses_only_the_listed_mx(world):
    """MTA-STS enforce: the policy lists only the second MX, which gets the mail over verified TLS; the preferred MX never does."""
    if world["policy_server"] is None:
        pytest.skip(world["why_no_policy"])
    send(world["relay"].port, "u@sts.test", "mta-sts")
    mx2 = world["sinks"]["127.0.0.25"]
    wait_until(lambda: received_by(mx2, "u@sts.test"), what="delivery to the policy's MX")
    line = delivery_line(world["relay"], "u@sts.test")
    assert "host=mx2.sts.test[127.0.0.25]" in line and "tls=(TLSv1." in line
    assert received_by(world["sinks"]["127.0.0.24"], "u@sts.test") == []
    assert world["policy_server"].requests == [("mta-sts.sts.test", "/.well-known/mta-sts.txt")]
    log = world["relay"].log()
    assert "MTA-STS: policy of sts.test (id 20240101T000000): mode enforce, mx mx2.sts.test" in log
    assert "MTA-STS: mx1.sts.test does not match the policy of sts.test; not used" in log
