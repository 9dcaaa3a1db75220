"""End-to-end submission: the relay started by twistd, smtplib authenticating over TLS.

The relay runs with a certificate made at test time, an auth_users file
written by relay-passwd (a real subprocess), a submission listener (STARTTLS)
and an implicit-TLS listener, and trusts no loopback client, so AUTH is
what lets a client relay.  Accepted mail goes to a smart host on a closed
port: it stays queued, so the spool shows what was accepted.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from certs import make_certificate
from relay.queue.store import Spool
from relayproc import RelayProcess, free_port, relay_env, wait_until

PASSWORD = "corr3ct horse"




def relay_passwd(users: Path, user: str, password: str) -> None:
    done = subprocess.run([sys.executable, "-m", "relay.cli.passwd", str(users), user], input=password + "\n",
                          capture_output=True, text=True, env=relay_env(), timeout=30)
    assert done.returncode == 0, done.stderr


def start_relay(workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(workdir, "relay.test", ("127.0.0.1",))
    users = workdir / "users"
    relay_passwd(users, "alice", PASSWORD)
    submission, implicit = free_port(), free_port()
    relay = RelayProcess(workdir, f'''
hostname = "relay.test"

[server]
trusted_networks = ["192.0.2.0/24"]
tls_certificate = "{cert}"
tls_key = "{key}"
auth_users = "{users}"
received_auth = true
submission_listen = ["tcp:{submission}:interface=127.0.0.1",
                     "ssl:{implicit}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]

[[routes]]
domains = ["*"]
smarthost = "127.0.0.1:{free_port()}"
''')
    return {"relay": relay, "cert": cert, "submission": submission, "implicit": implicit}


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """One relay for the module, stopped by its PID at the end."""
    parts = start_relay(tmp_path_factory.mktemp("submission"))
    request.addfinalizer(parts["relay"].kill)
    parts["relay"].start()
    wait_until(lambda: _listening(parts["submission"]) and _listening(parts["implicit"]), what="submission ports")
    return parts


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tls_context(world: dict) -> ssl.SSLContext:
    """Verifies the relay's certificate (the test certificate is its own CA)."""
    return ssl.create_default_context(cafile=str(world["cert"]))


def queued(world: dict, subject: bytes):
    """The queued envelope and bytes of the message carrying ``subject`` (bounded wait)."""
    spool = Spool(str(world["relay"].queue_dir))

    def find():
        for queue_id in spool.ids():
            try:
                with spool.open_message(queue_id) as f:
                    data = f.read()
                if subject in data:
                    return spool.load(queue_id), data
            except (KeyError, OSError):
                continue
        return None
    return wait_until(find, what=f"{subject!r} in the spool")


def test_starttls_login_submits(world):
    """STARTTLS then AUTH on the submission port: 250, queued with auth_user, Message-ID/Date added."""
    with smtplib.SMTP("127.0.0.1", world["submission"], timeout=10) as s:
        s.ehlo("laptop.test")
        assert not s.has_extn("auth")
        s.starttls(context=tls_context(world))
        s.ehlo("laptop.test")
        assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
        s.login("alice", PASSWORD)
        refused = s.sendmail("alice@example.org", ["friend@elsewhere.test"], b"Subject: e2e-starttls\r\n\r\nhi\r\n")
        assert refused == {}
    envelope, data = queued(world, b"Subject: e2e-starttls")
    assert envelope.client.auth_user == "alice" and envelope.client.protocol == "ESMTPSA"
    assert envelope.client.tls.startswith("TLSv1.")
    assert b"(Authenticated sender: alice)" in data and b"with ESMTPSA id" in data
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data


def test_implicit_tls_submits(world):
    """SMTP_SSL on the implicit-TLS port: no STARTTLS offered, AUTH offered, 250 and queued as ESMTPSA."""
    with smtplib.SMTP_SSL("127.0.0.1", world["implicit"], timeout=10, context=tls_context(world)) as s:
        s.ehlo("laptop.test")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login("alice", PASSWORD)
        s.sendmail("alice@example.org", ["friend@elsewhere.test"], b"Subject: e2e-implicit\r\n\r\nhi\r\n")
    envelope, _ = queued(world, b"Subject: e2e-implicit")
    assert (envelope.client.auth_user, envelope.client.protocol) == ("alice", "ESMTPSA")


def test_wrong_password_gets_535(world):
    """A wrong password is refused with 535 5.7.8."""
    with smtplib.SMTP_SSL("127.0.0.1", world["implicit"], timeout=10, context=tls_context(world)) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            s.login("alice", "not the password")
    assert caught.value.smtp_code == 535 and caught.value.smtp_error.startswith(b"5.7.8")


def test_mail_before_auth_gets_530(world):
    """On the submission port MAIL before AUTH is refused with 530 5.7.0, even after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", world["submission"], timeout=10) as s:
        s.starttls(context=tls_context(world))
        s.ehlo("laptop.test")
        code, text = s.mail("alice@example.org")
    assert (code, text[:5]) == (530, b"5.7.0")


def test_relaying_needs_auth_on_the_main_listener(world):
    """An untrusted client is refused relaying (554 5.7.1) until it authenticates after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", world["relay"].port, timeout=10) as s:
        s.ehlo("app.test")
        s.mail("app@example.org")
        code, text = s.rcpt("someone@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        s.rset()
        s.starttls(context=tls_context(world))
        s.ehlo("app.test")
        s.login("alice", PASSWORD)
        s.sendmail("app@example.org", ["someone@elsewhere.test"], b"Subject: e2e-main\r\n\r\nhi\r\n")
    envelope, data = queued(world, b"Subject: e2e-main")
    assert envelope.client.auth_user == "alice"
    assert b"Message-ID" not in data  # only submission listeners complete messages


def test_password_change_applies_without_restart(world, tmp_path):
    """A user added by relay-passwd while the relay runs can log in at once."""
    users = Path(world["relay"].workdir) / "users"
    relay_passwd(users, "bob", "bob's pass")
    with smtplib.SMTP_SSL("127.0.0.1", world["implicit"], timeout=10, context=tls_context(world)) as s:
        code, _ = s.login("bob", "bob's pass")
    assert code == 235
    assert "bob's pass" not in world["relay"].log()


def test_sigterm_closes_open_sessions_with_421(tmp_path):
    """On SIGTERM an open session gets 421 4.3.2 and the relay exits 0."""
    parts = start_relay(tmp_path / "stop")
    relay = parts["relay"]
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.ehlo("app.test")
            relay.proc.send_signal(__import__("signal").SIGTERM)
            code, text = s.getreply()
        assert (code, text) == (421, b"4.3.2 relay.test Service shutting down, closing transmission channel")
        assert relay.proc.wait(20) == 0
