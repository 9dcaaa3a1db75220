"""``relay-passwd``: add, change or delete a user of the ``[server] auth_users`` file.

This module owns the command::

    relay-passwd FILE USER            add USER or change its password
    relay-passwd --delete FILE USER   remove USER

The password is asked twice with getpass when standard input is a terminal,
otherwise one line is read from standard input (for scripts).  The file is
created with mode 0600; an existing file keeps its mode, its comments and
its other lines.  It is replaced atomically (written to a temporary file in
the same directory, fsynced, renamed over the old one), so a running relay
never reads half a file and picks the change up at the next AUTH.  When
FILE is a symbolic link, the file it points to is replaced and the link
stays as it is.

Exit status: 0 on success, 2 with one line on stderr for any error.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from typing import NoReturn, Optional, Sequence, TextIO

from relay.auth import hash_password, user_name_problem

PROG = "relay-passwd"
EXIT_OK = 0
EXIT_USAGE = 2
FILE_MODE = 0o600


class PasswdError(Exception):
    """A problem to report in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PasswdError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Add, change or delete a user of the relay's auth_users file.")
    parser.add_argument("--delete", action="store_true", help="remove USER instead of setting its password")
    parser.add_argument("file", metavar="FILE", help="the auth_users file ([server] auth_users)")
    parser.add_argument("user", metavar="USER", help="the user name clients give to AUTH")
    return parser


# -- the password --------------------------------------------------------------------


def read_password(stdin: TextIO) -> str:
    """Twice with getpass on a terminal, else one line of ``stdin``; it must be UTF-8 text."""
    try:
        if stdin.isatty():
            first = getpass.getpass("New password: ")
            second = getpass.getpass("Repeat password: ")
            if first != second:
                raise PasswdError("the two passwords differ; nothing changed")
            password = first
        else:
            line = _read_line(stdin)
            password = line[:-1] if line.endswith("\n") else line
            password = password[:-1] if password.endswith("\r") else password
        password.encode("utf-8")  # text decoded with surrogateescape holds lone surrogates
    except UnicodeError:
        raise PasswdError("the password is not UTF-8 text; nothing changed") from None
    if not password:
        raise PasswdError("empty password; nothing changed")
    return password


def _read_line(stdin: TextIO) -> str:
    """One line of ``stdin`` decoded as strict UTF-8, whatever the locale's encoding."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        return stdin.readline()
    return raw.readline().decode("utf-8")


# -- the file ------------------------------------------------------------------------


def _read_lines(path: str, must_exist: bool) -> tuple[list[str], Optional[int]]:
    """The file's lines (with their line ends) and its mode; ([], None) when it does not exist."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        if must_exist:
            raise PasswdError(f"{path}: no such file") from None
        return [], None
    except (OSError, UnicodeDecodeError) as e:
        raise PasswdError(f"{path}: cannot read: {_reason(e)}") from None
    return lines, mode


def _user_of(line: str) -> Optional[str]:
    text = line.strip()
    if not text or text.startswith("#") or ":" not in text:
        return None
    return text.partition(":")[0]


def set_user(lines: list[str], user: str, encoded: str) -> tuple[list[str], bool]:
    """The lines with USER's hash set (in place of its first line, others of it dropped); True when added."""
    entry = f"{user}:{encoded}\n"
    out: list[str] = []
    replaced = False
    for line in lines:
        if _user_of(line) == user:
            if not replaced:
                out.append(entry)
                replaced = True
            continue
        out.append(line)
    if not replaced:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(entry)
    return out, not replaced


def delete_user(lines: list[str], user: str) -> list[str]:
    """The lines without USER; PasswdError when USER is not there."""
    out = [line for line in lines if _user_of(line) != user]
    if len(out) == len(lines):
        raise PasswdError(f"no user {user!r}")
    return out


def write_atomically(path: str, lines: list[str], mode: Optional[int]) -> None:
    """Temporary file in the same directory, fsync, rename over ``path``, fsync the directory.

    A symbolic link is followed: the file it names is replaced, the link is kept.
    """
    shown = path
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=".relay-passwd.", dir=directory)  # mode 0600
    except OSError as e:
        raise PasswdError(f"{shown}: cannot write: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, FILE_MODE if mode is None else mode)
        os.replace(temporary, path)
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise PasswdError(f"{shown}: cannot write: {_reason(e)}") from None
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


# -- the command ---------------------------------------------------------------------


def run(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> int:
    """The command without exit handling; raises PasswdError."""
    args = _parser().parse_args(list(argv))
    problem = user_name_problem(args.user)
    if problem:
        raise PasswdError(f"user name {args.user!r} {problem}")
    if args.delete:
        lines, mode = _read_lines(args.file, must_exist=True)
        write_atomically(args.file, delete_user(lines, args.user), mode)
        stdout.write(f"{PROG}: deleted user {args.user} from {args.file}\n")
        return EXIT_OK
    lines, mode = _read_lines(args.file, must_exist=False)
    password = read_password(stdin)
    lines, added = set_user(lines, args.user, hash_password(password))
    write_atomically(args.file, lines, mode)
    stdout.write(f"{PROG}: {'added' if added else 'changed'} user {args.user} in {args.file}\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: ``relay-passwd [--delete] FILE USER``."""
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdin, sys.stdout)
    except PasswdError as e:
        sys.stderr.write(f"{PROG}: {' '.join(str(e).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; nothing changed\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
