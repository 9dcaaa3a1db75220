"""Tests for relay-passwd (relay.cli.passwd): adding, changing and deleting users of auth_users."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import relay.auth as auth
import relay.cli.passwd as passwd
from relay.auth import parse_users, verify_password
from relay.cli.passwd import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash with cheap scrypt parameters: the format is the same, the tests stay fast."""
    real = auth.hash_password
    monkeypatch.setattr(passwd, "hash_password", lambda password: real(password, n=1024))


class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def run(monkeypatch: pytest.MonkeyPatch, args: list[str], stdin: str = "", tty: bool = False) -> int:
    monkeypatch.setattr(sys, "stdin", FakeStdin(stdin, tty))
    return main(args)


def users_of(path: Path) -> dict[str, str]:
    users, problems = parse_users(path.read_text())
    assert problems == []
    return users


def test_add_creates_file_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """Adding a user to a missing file creates it with mode 0600 and a verifiable scrypt hash."""
    path = tmp_path / "users"
    assert run(monkeypatch, [str(path), "alice"], "s3cret pass\n") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = users_of(path)
    assert list(users) == ["alice"] and users["alice"].startswith("scrypt$")
    assert verify_password(b"s3cret pass", users["alice"])
    assert capsys.readouterr().out == f"relay-passwd: added user alice in {path}\n"


def test_change_keeps_other_lines_comments_and_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing a user replaces only its line; comments, other users and the file's mode stay."""
    path = tmp_path / "users"
    run(monkeypatch, [str(path), "alice"], "one\n")
    run(monkeypatch, [str(path), "bob"], "two\n")
    path.write_text("# relay users\n" + path.read_text() + "\n# end\n")
    os.chmod(path, 0o640)
    assert run(monkeypatch, [str(path), "alice"], "three\r\n") == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "# relay users" and lines[1].startswith("alice:") and lines[2].startswith("bob:")
    assert lines[-1] == "# end"
    users = users_of(path)
    assert verify_password(b"three", users["alice"]) and verify_password(b"two", users["bob"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary left behind


def test_delete_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--delete removes the user's line and keeps the rest."""
    path = tmp_path / "users"
    run(monkeypatch, [str(path), "alice"], "one\n")
    run(monkeypatch, [str(path), "bob"], "two\n")
    capsys.readouterr()
    assert run(monkeypatch, ["--delete", str(path), "alice"]) == 0
    assert list(users_of(path)) == ["bob"]
    assert capsys.readouterr().out == f"relay-passwd: deleted user alice from {path}\n"


def test_tty_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the password is asked twice with getpass and must match."""
    answers = iter(["pw-one", "pw-one"])
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(passwd.getpass, "getpass", fake_getpass)
    path = tmp_path / "users"
    assert run(monkeypatch, [str(path), "alice"], tty=True) == 0
    assert len(prompts) == 2 and verify_password(b"pw-one", users_of(path)["alice"])


def test_tty_mismatch_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    """Two different passwords on a terminal: exit 2, one line, no file written."""
    answers = iter(["a", "b"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt: next(answers))
    path = tmp_path / "users"
    assert run(monkeypatch, [str(path), "alice"], tty=True) == 2
    assert capsys.readouterr().err == "relay-passwd: the two passwords differ; nothing changed\n"
    assert not path.exists()


@pytest.mark.parametrize("args, stdin, expected", [
    (["{file}", "alice"], "\n", "relay-passwd: empty password; nothing changed\n"),
    (["{file}", "bad user"], "pw\n", "relay-passwd: user name 'bad user' must be printable ASCII without spaces\n"),
    (["{file}", "a:b"], "pw\n", "relay-passwd: user name 'a:b' must not contain ':'\n"),
    (["{file}", "#root"], "pw\n", "relay-passwd: user name '#root' must not start with '#'\n"),
    (["--delete", "{file}", "alice"], "", "relay-passwd: {file}: no such file\n"),
    (["{file}"], "", "relay-passwd: the following arguments are required: USER\n"),
    (["--bogus", "{file}", "alice"], "", "relay-passwd: unrecognized arguments: --bogus\n"),
    (["{dir}/missing/users", "alice"], "pw\n",
     "relay-passwd: {dir}/missing/users: cannot write: [Errno 2] No such file or directory\n"),
])
def test_errors_are_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture, args: list[str], stdin: str,
                                    expected: str) -> None:
    """Every error is one line on stderr and exit status 2."""
    file = tmp_path / "users"
    args = [a.format(file=file, dir=tmp_path) for a in args]
    assert run(monkeypatch, args, stdin) == 2
    assert capsys.readouterr().err == expected.format(file=file, dir=tmp_path)


def test_delete_unknown_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Deleting a user who is not in the file is an error and leaves the file as it was."""
    path = tmp_path / "users"
    run(monkeypatch, [str(path), "alice"], "pw\n")
    before = path.read_text()
    capsys.readouterr()
    assert run(monkeypatch, ["--delete", str(path), "bob"]) == 2
    assert capsys.readouterr().err == "relay-passwd: no user 'bob'\n"
    assert path.read_text() == before


def test_runnable_as_module(tmp_path: Path) -> None:
    """python -m relay.cli.passwd reads the password from a pipe and writes the file."""
    path = tmp_path / "users"
    env: dict[str, Any] = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "relay.cli.passwd", str(path), "carol"], input="pipe pw\n",
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert verify_password(b"pipe pw", users_of(path)["carol"])


def test_non_utf8_password_is_one_line_error(tmp_path: Path) -> None:
    """A password that is not UTF-8 on a pipe is refused with one line and exit 2, no traceback, no file written."""
    path = tmp_path / "users"
    env: dict[str, Any] = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C.UTF-8")
    done = subprocess.run([sys.executable, "-m", "relay.cli.passwd", str(path), "carol"], input=b"\xff\xfepw\n",
                          capture_output=True, env=env, timeout=30)
    assert done.returncode == 2
    assert done.stderr == b"relay-passwd: the password is not UTF-8 text; nothing changed\n"
    assert not path.exists()


def test_surrogate_escaped_password_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """Text holding lone surrogates (undecodable bytes read with surrogateescape) is refused, not hashed."""
    assert run(monkeypatch, [str(tmp_path / "users"), "alice"], "pw\udcff\n") == 2
    assert capsys.readouterr().err == "relay-passwd: the password is not UTF-8 text; nothing changed\n"


def test_symlinked_users_file_is_written_through_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When FILE is a symbolic link, the file it names is replaced (mode kept) and the link stays a link."""
    target_dir = tmp_path / "etc"
    target_dir.mkdir()
    target = target_dir / "users"
    run(monkeypatch, [str(target), "alice"], "one\n")
    os.chmod(target, 0o640)
    link = tmp_path / "users-link"
    link.symlink_to(target)
    assert run(monkeypatch, [str(link), "bob"], "two\n") == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert set(users_of(target)) == {"alice", "bob"}
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".relay-passwd")] == []
