"""Inbound authentication: the ``auth_users`` password file and its twisted.cred checker.

This module owns the password hash format, the reading of the
``[server] auth_users`` file, the verification of a user name and password
against it, and the ``[server] sender_login_map`` file (which addresses an
authenticated user may use as envelope sender).

The file holds one ``user:hash`` line per user; ``#`` comments and blank
lines are allowed.  The hash is the standard library's scrypt in a
self-describing string::

    scrypt$n=16384,r=8,p=1$<salt, base64>$<derived key, base64>

The SMTP server asks a twisted.cred ``Portal``: ``ScryptChecker`` (an
``ICredentialsChecker`` for ``IUsernamePassword``) checks the credentials and
the trivial ``SubmitterRealm`` turns the user name into an ``ISubmitter``
avatar.  Any other checker for ``IUsernamePassword`` (LDAP, PAM) fits the
same portal.

scrypt costs tens of milliseconds on purpose, and the file is read from
disk: both happen in a thread (``runner``, by default ``deferToThread``),
never on the reactor thread.  Files are re-read when they change on disk
(modification time, size or inode), so ``relay-passwd`` takes effect
without a restart.  Log lines are emitted on the reactor thread only, and
never carry a password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from relay.log import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger(namespace="relay.auth")

SCHEME = "scrypt"
DEFAULT_N = 16384  # CPU/memory cost: 128 * r * n = 16 MiB of memory per check
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_N = 1 << 20  # refuse hashes that would cost more than ~1 GiB
MAX_R = 32
MAX_P = 16

Runner = Callable[..., Deferred]


class AuthUnavailable(Exception):
    """The password file cannot be read: authentication is temporarily impossible."""


# -- the hash format ---------------------------------------------------------------


@dataclass(frozen=True)
class ScryptHash:
    """A parsed ``scrypt$n=..,r=..,p=..$salt$key`` string."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"{SCHEME}$n={self.n},r={self.r},p={self.p}${salt}${key}"


def _b64(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, validate=True)


def parse_hash(encoded: str) -> ScryptHash:
    """Read a hash string; ValueError with a short reason when it is not one."""
    parts = encoded.strip().split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(f"not a {SCHEME}$params$salt$key hash")
    try:
        params = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(params.pop("n")), int(params.pop("r")), int(params.pop("p"))
    except (ValueError, KeyError):
        raise ValueError("scrypt parameters must be n=..,r=..,p=..") from None
    if params:
        raise ValueError(f"unknown scrypt parameter {sorted(params)[0]!r}")
    if n < 2 or n & (n - 1) or n > MAX_N or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise ValueError("scrypt parameters out of range")
    try:
        salt, key = _b64(parts[2]), _b64(parts[3])
    except (binascii.Error, ValueError):
        raise ValueError("salt or key is not base64") from None
    if not salt or len(key) < 16:
        raise ValueError("salt or key too short")
    return ScryptHash(n, r, p, salt, key)


def _derive(password: bytes, n: int, r: int, p: int, salt: bytes, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * r * (n + p + 2) + (1 << 20))


def hash_password(password: str, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P,
                  salt: Optional[bytes] = None) -> str:
    """The hash string for ``password`` (UTF-8), with a fresh random salt unless given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = _derive(password.encode("utf-8"), n, r, p, salt, KEY_BYTES)
    return ScryptHash(n, r, p, salt, key).encode()


def verify_password(password: bytes, encoded: str) -> bool:
    """True when ``password`` matches the hash string (constant-time comparison)."""
    try:
        parsed = parse_hash(encoded)
    except ValueError:
        return False
    key = _derive(password, parsed.n, parsed.r, parsed.p, parsed.salt, len(parsed.key))
    return hmac.compare_digest(key, parsed.key)


# A hash of nothing anybody knows: unknown users cost as much time as known ones.
_DUMMY_HASH = ScryptHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, b"\0" * SALT_BYTES, b"\0" * KEY_BYTES).encode()


# -- user names ------------------------------------------------------------------------


def user_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a user name in the file, or None.

    Names are printable ASCII without spaces or ``:`` (the separator), and do
    not start with ``#`` (a comment): they appear in logs and, with
    ``received_auth``, in the Received header.
    """
    if not name:
        return "is empty"
    if not name.isascii() or not name.isprintable() or any(c.isspace() for c in name):
        return "must be printable ASCII without spaces"
    if ":" in name:
        return "must not contain ':'"
    if name.startswith("#"):
        return "must not start with '#'"
    return None


# -- files re-read when they change ---------------------------------------------------------

_Data = TypeVar("_Data")


class WatchedFile(Generic[_Data]):
    """A small text file parsed by ``parse`` and re-read whenever it changes on disk.

    ``current()`` may be called from any thread; it stats the file and
    re-reads it when its (mtime, size, inode) changed.  It returns the data
    and the problems found by the last re-read (empty when nothing was
    re-read), so the caller can log them on the reactor thread.  An
    unreadable file raises OSError.
    """

    def __init__(self, path: str, parse: Callable[[str], tuple[_Data, list[str]]]) -> None:
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._data: Optional[_Data] = None

    def current(self) -> tuple[_Data, list[str]]:
        with self._lock:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            if stamp == self._stamp and self._data is not None:
                return self._data, []
            with open(self.path, "r", encoding="utf-8", errors="replace") as f:
                text = f.read()
            data, problems = self._parse(text)
            self._data, self._stamp = data, stamp
            return data, problems


def parse_users(text: str) -> tuple[dict[str, str], list[str]]:
    """``user:hash`` lines -> {user: hash}; malformed lines are skipped and described."""
    users: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        problem = "no ':' between user and hash" if not sep else user_name_problem(user)
        if problem is None:
            try:
                parse_hash(encoded)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            problems.append(f"line {number}: {problem}, line ignored")
            continue
        if user in users:
            problems.append(f"line {number}: user {user} repeated, the later line wins")
        users[user] = encoded.strip()
    return users, problems


class UserFile(WatchedFile[dict]):
    """The ``auth_users`` file."""

    def __init__(self, path: str) -> None:
        super().__init__(path, parse_users)


def log_problems(path: str, problems: list[str]) -> None:
    for problem in problems:
        log.warn("{path}: {problem}", path=path, problem=problem)


# -- twisted.cred: checker, realm, portal ---------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    """What a check in the thread found; logged and judged on the reactor thread."""

    user: str
    ok: bool
    problems: list
    unavailable: str = ""  # why the file could not be read


@implementer(ICredentialsChecker)
class ScryptChecker:
    """Checks IUsernamePassword credentials against the auth_users file, in a thread."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: UserFile, runner: Runner = deferToThread) -> None:
        self.users = users
        self._runner = runner

    def requestAvatarId(self, credentials: Any) -> Deferred:
        """A Deferred firing with the user name, or failing with UnauthorizedLogin / AuthUnavailable."""
        d = self._runner(self.check, credentials.username, credentials.password)
        return d.addCallback(self._judge)

    def check(self, username: bytes, password: bytes) -> _Verdict:
        """Look the user up and verify the password (blocking: call it in a thread)."""
        name = username.decode("utf-8", "replace") if isinstance(username, bytes) else str(username)
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            users, problems = self.users.current()
        except OSError as e:
            return _Verdict(name, False, [], unavailable=e.strerror or type(e).__name__)
        encoded = users.get(name)
        ok = verify_password(password, encoded if encoded is not None else _DUMMY_HASH)
        return _Verdict(name, ok and encoded is not None, problems)

    def _judge(self, verdict: _Verdict) -> str:
        log_problems(self.users.path, verdict.problems)
        if verdict.unavailable:
            log.error("cannot read {path}: {reason}", path=self.users.path, reason=verdict.unavailable)
            raise AuthUnavailable(verdict.unavailable)
        if not verdict.ok:
            raise UnauthorizedLogin()
        return verdict.user


class ISubmitter(Interface):
    """An authenticated client of the relay, as the SMTP server sees it."""

    name = Attribute("The authenticated user name (str).")


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    name: str


@implementer(IRealm)
class SubmitterRealm:
    """Turns a checked user name into an ISubmitter; nothing to clean up at logout."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return ISubmitter, Submitter(name), lambda: None


def build_portal(path: str, runner: Runner = deferToThread) -> Portal:
    """The portal for the ``auth_users`` file at ``path``.

    The file is read once now, so problems in it are logged at start-up;
    if it cannot be read, every authentication answers a temporary failure
    until it can (the configuration loader has already refused a missing file).
    """
    users = UserFile(path)
    try:
        found, problems = users.current()
    except OSError as e:
        log.error("cannot read {path}: {reason}; authentication fails until it can be read",
                  path=path, reason=e.strerror or type(e).__name__)
    else:
        log_problems(path, problems)
        log.info("{path}: {count} user(s) may authenticate", path=path, count=len(found))
    return Portal(SubmitterRealm(), [ScryptChecker(users, runner)])


# -- sender_login_map ---------------------------------------------------------------------------


def parse_sender_logins(text: str) -> tuple[dict[str, frozenset], list[str]]:
    """``address-or-@domain  user[,user...]`` lines -> {lower-case key: users}."""
    owners: dict[str, frozenset] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 1)
        key = fields[0].lower()
        users = [u.strip() for u in fields[1].split(",")] if len(fields) == 2 else []
        if "@" not in key or key.endswith("@") or not users or any(not u or " " in u for u in users):
            problems.append(f"line {number}: expected 'address-or-@domain user[,user...]', line ignored")
            continue
        owners[key] = owners.get(key, frozenset()) | frozenset(users)
    return owners, problems


class SenderLoginMap:
    """Which authenticated users may use which envelope senders (``[server] sender_login_map``)."""

    def __init__(self, path: str, runner: Runner = deferToThread) -> None:
        self.file: WatchedFile[dict] = WatchedFile(path, parse_sender_logins)
        self._runner = runner

    def owners(self, address: str) -> tuple[frozenset, list[str]]:
        """Users owning ``address`` (exact address first, then ``@domain``); blocking."""
        table, problems = self.file.current()
        key = address.lower()
        users = table.get(key)
        if users is None:
            users = table.get("@" + key.rpartition("@")[2], frozenset())
        return users, problems

    def may_use(self, user: str, address: str) -> Deferred:
        """A Deferred firing True when ``user`` owns ``address``, False when not, None when the file is unreadable."""
        d = self._runner(self._owns, user, address)
        return d.addCallback(self._logged)

    def _owns(self, user: str, address: str) -> tuple[bool, list[str], str]:
        try:
            users, problems = self.owners(address)
        except OSError as e:
            return False, [], e.strerror or type(e).__name__
        return user in users, problems, ""

    def _logged(self, result: tuple[bool, list[str], str]) -> Optional[bool]:
        owned, problems, unreadable = result
        log_problems(self.file.path, problems)
        if unreadable:
            log.error("cannot read {path}: {reason}", path=self.file.path, reason=unreadable)
            return None
        return owned


# -- start-up check ----------------------------------------------------------------------------


def check_files(server: Any, source: str) -> None:
    """Every file named by server.auth_users and server.sender_login_map can be read now.

    Raises ConfigError naming ``source`` and the key (run at start-up, before the reactor).
    """
    from relay.config_values import ConfigError

    for key in ("auth_users", "sender_login_map"):
        path = getattr(server, key, "")
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
            raise ConfigError(f"{source}: server.{key}: cannot read {path!r}: {reason}") from None
