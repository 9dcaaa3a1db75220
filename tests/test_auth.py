"""Tests for relay.auth (hashes, the auth_users file, the twisted.cred checker, the sender
login map), for RelayPolicy.check_sender, and for the [server] keys of AUTH and submission."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import relay.auth as auth
from relay.auth import (
    AuthUnavailable,
    ISubmitter,
    ScryptChecker,
    SenderLoginMap,
    SubmitterRealm,
    UserFile,
    build_portal,
    check_files,
    hash_password,
    parse_hash,
    parse_sender_logins,
    parse_users,
    verify_password,
)
from relay.config import ServerConfig, config_from_mapping
from relay.config_values import ConfigError
from relay.envelope import ClientInfo
from relay.policy import RelayPolicy

FAST = {"n": 1024, "r": 8, "p": 1}  # cheap parameters, so the tests stay fast


def synchronous(f: Callable, *args: Any) -> Deferred:
    """A runner that calls in the test's thread instead of a thread pool."""
    return maybeDeferred(f, *args)


def write_users(path: Path, **passwords: str) -> None:
    path.write_text("".join(f"{user}:{hash_password(pw, **FAST)}\n" for user, pw in passwords.items()))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    captured: list[dict] = []
    monkeypatch.setattr(auth, "log", Logger(namespace="test", observer=captured.append))
    return captured


# -- the hash format --------------------------------------------------------------------------


def test_hash_format_round_trip() -> None:
    """A hash is scrypt$n=..,r=..,p=..$salt$key with a 16-octet salt and 32-octet key, and re-encodes identically."""
    encoded = hash_password("correct horse", **FAST)
    assert encoded.startswith("scrypt$n=1024,r=8,p=1$")
    parsed = parse_hash(encoded)
    assert (parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.key)) == (1024, 8, 1, 16, 32)
    assert parsed.encode() == encoded


def test_default_parameters() -> None:
    """Without parameters the hash uses n=16384, r=8, p=1 and still verifies."""
    encoded = hash_password("pw")
    assert encoded.startswith("scrypt$n=16384,r=8,p=1$")
    assert verify_password(b"pw", encoded)


def test_salt_makes_hashes_differ() -> None:
    """Two hashes of one password differ (random salt); a given salt gives a reproducible hash."""
    assert hash_password("pw", **FAST) != hash_password("pw", **FAST)
    assert hash_password("pw", salt=b"s" * 16, **FAST) == hash_password("pw", salt=b"s" * 16, **FAST)


def test_verify_right_and_wrong() -> None:
    """verify_password accepts the password (UTF-8) and refuses any other or a malformed hash."""
    encoded = hash_password("pässword", **FAST)
    assert verify_password("pässword".encode(), encoded)
    assert not verify_password(b"password", encoded)
    assert not verify_password(b"", encoded)
    assert not verify_password(b"x", "plain-text")


@pytest.mark.parametrize("encoded", [
    "", "bcrypt$x$y$z", "scrypt$n=1024,r=8$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",
    "scrypt$n=1000,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",  # n not a power of 2
    "scrypt$n=1024,r=8,p=1,q=2$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",
    "scrypt$n=1024,r=8,p=1$!!$a2V5a2V5a2V5a2V5a2V5a2V5",
    "scrypt$n=1024,r=8,p=1$c2FsdA$a2V5",  # key too short
    "scrypt$n=4194304,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",  # too costly
])
def test_malformed_hashes_refused(encoded: str) -> None:
    """parse_hash refuses anything but a well-formed scrypt string with sane parameters."""
    with pytest.raises(ValueError):
        parse_hash(encoded)


# -- the file -----------------------------------------------------------------------------------


def test_parse_users_skips_comments_and_malformed_lines() -> None:
    """Comments and blank lines are skipped; malformed lines are reported by number and ignored."""
    good = hash_password("pw", **FAST)
    text = (f"# users\n\nalice:{good}\n  bob:{good}  \nno-colon-here\ncarol:not-a-hash\n"
            f"bad user:{good}\n#x:{good}\nalice:{good}\n")
    users, problems = parse_users(text)
    assert users == {"alice": good, "bob": good}
    assert [p.split(":")[0] for p in problems] == ["line 5", "line 6", "line 7", "line 9"]
    assert "no ':'" in problems[0] and "repeated" in problems[3]


def test_file_reloaded_when_changed(tmp_path: Path) -> None:
    """UserFile re-reads the file when it changes on disk and not otherwise."""
    path = tmp_path / "users"
    write_users(path, alice="one")
    users = UserFile(str(path))
    first, _ = users.current()
    assert set(first) == {"alice"}
    assert users.current()[0] is first  # unchanged: not re-read
    write_users(path, alice="two", bob="three")
    os.utime(path, ns=(1, 1))
    second, _ = users.current()
    assert set(second) == {"alice", "bob"}
    assert verify_password(b"two", second["alice"])


# -- the checker, the realm, the portal ---------------------------------------------------------------


class CheckerTests(SynchronousTestCase):
    """ScryptChecker and the portal, with a synchronous runner in place of the thread pool."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = Path(directory) / "users"
        write_users(self.path, alice="s3cret", bob="other")
        self.events: list[dict] = []
        self.patch(auth, "log", Logger(namespace="test", observer=self.events.append))
        self.checker = ScryptChecker(UserFile(str(self.path)), synchronous)

    def test_provides_the_interfaces(self) -> None:
        """The checker is an ICredentialsChecker for IUsernamePassword and the realm an IRealm."""
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IRealm, SubmitterRealm())

    def test_right_password(self) -> None:
        """The right password yields the user name."""
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_wrong_password_and_unknown_user(self) -> None:
        """A wrong password or an unknown user fails with UnauthorizedLogin."""
        for user, password in ((b"alice", b"other"), (b"mallory", b"s3cret"), (b"", b"")):
            d = self.checker.requestAvatarId(UsernamePassword(user, password))
            self.failureResultOf(d, UnauthorizedLogin)

    def test_unreadable_file_is_temporary(self) -> None:
        """A file that disappeared fails with AuthUnavailable and an error line naming it."""
        self.path.unlink()
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.failureResultOf(d, AuthUnavailable)
        self.assertIn(str(self.path), formatEvent(self.events[-1]))

    def test_change_applies_without_restart(self) -> None:
        """A password changed in the file is the one checked at the next attempt."""
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret")))
        write_users(self.path, alice="new one")
        os.utime(self.path, ns=(2, 2))
        self.failureResultOf(self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret")),
                             UnauthorizedLogin)
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword(b"alice", b"new one")))

    def test_malformed_lines_logged_on_reload(self) -> None:
        """Malformed lines found at a re-read are logged once each, naming file and line."""
        with self.path.open("a") as f:
            f.write("garbage\n")
        os.utime(self.path, ns=(3, 3))
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword(b"bob", b"other")))
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword(b"bob", b"other")))
        lines = [formatEvent(e) for e in self.events]
        self.assertEqual(lines, [f"{self.path}: line 3: no ':' between user and hash, line ignored"])

    def test_portal_login_gives_a_submitter(self) -> None:
        """build_portal's portal logs alice in as an ISubmitter named alice."""
        portal = build_portal(str(self.path), synchronous)
        interface, avatar, logout = self.successResultOf(
            portal.login(UsernamePassword(b"alice", b"s3cret"), None, ISubmitter))
        self.assertIs(interface, ISubmitter)
        self.assertEqual(avatar.name, "alice")
        logout()
        self.failureResultOf(portal.login(UsernamePassword(b"alice", b"bad"), None, ISubmitter),
                             UnauthorizedLogin)

    def test_log_never_carries_the_password(self) -> None:
        """Nothing the checker logs, at success, failure or reload, carries the password."""
        with self.path.open("a") as f:
            f.write("oops\n")
        os.utime(self.path, ns=(4, 4))
        self.checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
        self.checker.requestAvatarId(UsernamePassword(b"alice", b"wrong-s3cret")).addErrback(lambda f: None)
        self.assertTrue(self.events)
        self.assertNotIn("s3cret", repr(self.events))


def test_real_thread_pool_check(tmp_path: Path) -> None:
    """check() run by a real thread (the default deferToThread path) verifies a password."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "users"
    write_users(path, alice="pw")
    checker = ScryptChecker(UserFile(str(path)))
    with ThreadPoolExecutor(1) as pool:
        verdict = pool.submit(checker.check, b"alice", b"pw").result(timeout=10)
    assert verdict.ok and verdict.user == "alice"


def test_build_portal_with_missing_file_logs(tmp_path: Path, events: list[dict]) -> None:
    """A portal built on a missing file logs an error; logins fail temporarily until the file exists."""
    path = tmp_path / "users"
    portal = build_portal(str(path), synchronous)
    assert "cannot read" in formatEvent(events[0])
    d = portal.login(UsernamePassword(b"alice", b"pw"), None, ISubmitter)
    failures: list = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(AuthUnavailable)
    write_users(path, alice="pw")
    results: list = []
    portal.login(UsernamePassword(b"alice", b"pw"), None, ISubmitter).addCallback(results.append)
    assert results[0][1].name == "alice"


# -- sender_login_map and RelayPolicy.check_sender ------------------------------------------------------


def test_parse_sender_logins() -> None:
    """Lines map lower-cased addresses or @domains to user sets; malformed lines are reported."""
    owners, problems = parse_sender_logins(
        "# map\nAlice@X.test alice\n@team.test alice, bob\nnobody\nalice@x.test carol\n@ alice\n")
    assert owners == {"alice@x.test": frozenset({"alice", "carol"}), "@team.test": frozenset({"alice", "bob"})}
    assert [p.split(":")[0] for p in problems] == ["line 4", "line 6"]


def sender_policy(tmp_path: Path) -> RelayPolicy:
    path = tmp_path / "senders"
    path.write_text("alice@x.test alice\n@team.test alice,bob\n")
    return RelayPolicy(ServerConfig(), sender_logins=SenderLoginMap(str(path), synchronous))


def _answer(value: Any) -> Any:
    results: list = []
    if isinstance(value, Deferred):
        value.addBoth(results.append)
        return results[0]
    return value


def test_check_sender_owned_addresses(tmp_path: Path) -> None:
    """An authenticated user may use its exact addresses and its @domains, case-insensitively."""
    policy = sender_policy(tmp_path)
    alice = ClientInfo(address="192.0.2.1", auth_user="alice")
    assert _answer(policy.check_sender(alice, "Alice@X.TEST")) is None
    assert _answer(policy.check_sender(alice, "anyone@team.test")) is None
    bob = ClientInfo(address="192.0.2.1", auth_user="bob")
    refusal = _answer(policy.check_sender(bob, "alice@x.test"))
    assert str(refusal) == "553 5.7.1 <alice@x.test>: Sender address rejected: not owned by user bob"
    assert _answer(policy.check_sender(bob, "x@elsewhere.test")).code == 553


def test_check_sender_exemptions(tmp_path: Path) -> None:
    """The null sender, unauthenticated clients and a policy without map are not checked."""
    policy = sender_policy(tmp_path)
    assert policy.check_sender(ClientInfo(address="192.0.2.1", auth_user="bob"), "") is None
    assert policy.check_sender(ClientInfo(address="127.0.0.1", trusted=True), "x@y.test") is None
    assert RelayPolicy(ServerConfig()).check_sender(ClientInfo(address="", auth_user="a"), "x@y.test") is None


def test_check_sender_unreadable_map_is_temporary(tmp_path: Path, events: list[dict]) -> None:
    """An unreadable map answers 451 4.3.0 (try later) and logs why."""
    policy = sender_policy(tmp_path)
    (tmp_path / "senders").unlink()
    refusal = _answer(policy.check_sender(ClientInfo(address="", auth_user="alice"), "alice@x.test"))
    assert (refusal.code, refusal.status) == (451, "4.3.0")
    assert "cannot read" in formatEvent(events[-1])


# -- configuration ---------------------------------------------------------------------------------


def test_server_keys_parse() -> None:
    """auth_in_clear, received_auth and sender_login_map are read from [server]; defaults are off."""
    assert (ServerConfig().auth_in_clear, ServerConfig().received_auth, ServerConfig().sender_login_map) == (
        False, False, "")
    config = config_from_mapping({"server": {
        "auth_users": "u", "auth_in_clear": True, "received_auth": True, "sender_login_map": "m"}}, "relay.toml")
    assert (config.server.auth_in_clear, config.server.received_auth, config.server.sender_login_map) == (
        True, True, "m")


@pytest.mark.parametrize("server, key, words", [
    ({"auth_in_clear": "yes"}, "server.auth_in_clear", "expected true or false"),
    ({"received_auth": 1}, "server.received_auth", "expected true or false"),
    ({"sender_login_map": 5}, "server.sender_login_map", "expected a string"),
    ({"sender_login_map": "m"}, "server.sender_login_map", "set server.auth_users too"),
    ({"auth_in_clr": True}, "server.auth_in_clr", "unknown key"),
])
def test_server_key_errors(server: dict, key: str, words: str) -> None:
    """Bad values are one-line errors naming the file and the dotted key."""
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"server": server}, "relay.toml")
    message = str(caught.value)
    assert message.startswith(f"relay.toml: {key}: ") and words in message and "\n" not in message


def test_check_files_names_the_key(tmp_path: Path) -> None:
    """A missing auth_users or sender_login_map file is a ConfigError naming the key and the file."""
    users = tmp_path / "users"
    with pytest.raises(ConfigError) as caught:
        check_files(ServerConfig(auth_users=str(users)), "relay.toml")
    assert str(caught.value).startswith(f"relay.toml: server.auth_users: cannot read '{users}': [Errno 2]")
    users.write_text("")
    check_files(ServerConfig(auth_users=str(users)), "relay.toml")
    with pytest.raises(ConfigError) as caught:
        check_files(ServerConfig(auth_users=str(users), sender_login_map=str(tmp_path / "m")), "relay.toml")
    assert "server.sender_login_map" in str(caught.value)


def test_twistd_options_refuse_missing_auth_users(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """twistd relay --config with a missing auth_users file exits 2 with one line naming server.auth_users."""
    from relay.tap import Options

    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nauth_users = "{tmp_path / "nope"}"\n')
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--config", str(config)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "server.auth_users: cannot read" in err
