"""The DSN parameters of RFC 3461 (and RFC 6533 for UTF-8 addresses) on the wire.

This module owns the syntax of ``RET`` and ``ENVID`` on MAIL and of
``NOTIFY`` and ``ORCPT`` on RCPT: the server checks them strictly with
``check_mail_param`` and ``check_rcpt_params`` and keeps them, as
received, in the envelope's parameters; the client passes them on to a next
hop that advertises DSN (``mail_params_to_send``, ``rcpt_params_to_send``);
the reports read them back with ``notify_words``, ``ret_value`` and
``xtext_decode``.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from relay.smtp.replies import (
    BAD_ENVID,
    BAD_NOTIFY,
    BAD_ORCPT,
    BAD_RET,
    REPEATED_DSN_PARAM,
    UNSUPPORTED_PARAM,
    Reply,
)

Params = tuple[tuple[str, Optional[str]], ...]

RET = "RET"
ENVID = "ENVID"
NOTIFY = "NOTIFY"
ORCPT = "ORCPT"
MAIL_KEYWORDS = (RET, ENVID)
RCPT_KEYWORDS = (NOTIFY, ORCPT)

RET_FULL = "FULL"
RET_HDRS = "HDRS"
NEVER = "NEVER"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
_NOTIFY_WORDS = frozenset((SUCCESS, FAILURE, DELAY))

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2


_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# utf-8-addr-xtext / utf-8-addr-unitext (RFC 6533 3): no controls, no space, no "+" or "=" raw.
_UTF8_ADDR = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2}|\\x\{[0-9A-F]{2,6}\}|[^\x00-\x7f])+")


def is_xtext(value: str) -> bool:
    """Whether ``value`` is xtext (RFC 3461 4): printable ASCII but "+" and "=", or "+HH"."""
    return _XTEXT.fullmatch(value) is not None


def xtext_encode(text: str) -> str:
    """``text`` (ASCII) as xtext: "+", "=", controls and space as "+HH"."""
    if _XTEXT_PLAIN.fullmatch(text):  # the usual address: nothing to encode
        return text
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def xtext_decode(value: str) -> str:
    """Decode the ``+HH`` escapes of xtext."""
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def check_mail_param(keyword: str, value: Optional[str], seen: Iterable[tuple[str, Optional[str]]]) -> Optional[Reply]:
    """Why a RET or ENVID parameter of MAIL is refused, or None (then keep it as received)."""
    if any(k == keyword for k, _ in seen):
        return REPEATED_DSN_PARAM
    if keyword == RET:
        return None if value is not None and value.upper() in (RET_FULL, RET_HDRS) else BAD_RET
    if value is None or not value or len(value) > MAX_ENVID or not is_xtext(value):
        return BAD_ENVID
    return None


def check_rcpt_params(params: Iterable[tuple[str, Optional[str]]], smtputf8: bool) -> Union[Reply, Params]:
    """The NOTIFY and ORCPT parameters of RCPT, checked (keywords upper case), or the refusal.

    Any other parameter is not ours: 555 5.5.4, as before.
    """
    kept: list[tuple[str, Optional[str]]] = []
    for keyword, value in params:
        keyword = keyword.upper()
        if keyword not in RCPT_KEYWORDS:
            return UNSUPPORTED_PARAM
        if any(k == keyword for k, _ in kept):
            return REPEATED_DSN_PARAM
        problem = _notify_problem(value) if keyword == NOTIFY else _orcpt_problem(value, smtputf8)
        if problem is not None:
            return problem
        kept.append((keyword, value))
    return tuple(kept)


def _notify_problem(value: Optional[str]) -> Optional[Reply]:
    if not value:
        return BAD_NOTIFY
    words = [w.upper() for w in value.split(",")]
    if words == [NEVER]:
        return None
    if not words or any(w not in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        return BAD_NOTIFY
    return None


def _orcpt_problem(value: Optional[str], smtputf8: bool) -> Optional[Reply]:
    if not value or len(value) > MAX_ORCPT or ";" not in value:
        return BAD_ORCPT
    addr_type, _, original = value.partition(";")
    if not _ATOM.fullmatch(addr_type) or not original:
        return BAD_ORCPT
    if addr_type.lower() == "utf-8":
        if _UTF8_ADDR.fullmatch(original) is None or (not original.isascii() and not smtputf8):
            return BAD_ORCPT
        return None
    return None if is_xtext(original) else BAD_ORCPT


# -- reading them back ---------------------------------------------------------------


def param(params: Params, keyword: str) -> Optional[str]:
    """The value of ``keyword`` among ``params`` (any case), or None."""
    for key, value in params:
        if key.upper() == keyword:
            return value
    return None


def notify_words(params: Params) -> Optional[frozenset[str]]:
    """The recipient's NOTIFY words (upper case; ``{"NEVER"}``), or None when NOTIFY was not given."""
    value = param(params, NOTIFY)
    if value is None:
        return None
    return frozenset(w.strip().upper() for w in value.split(","))


def ret_value(params: Params) -> Optional[str]:
    """``FULL``, ``HDRS`` or None (not given) from the MAIL parameters."""
    value = param(params, RET)
    return value.upper() if value else None


# -- passing them on -----------------------------------------------------------------


def mail_params_to_send(params: Params) -> list[str]:
    """``RET=...`` and ``ENVID=...`` for the MAIL command to a next hop that advertises DSN."""
    out = []
    for keyword in MAIL_KEYWORDS:
        value = param(params, keyword)
        if value is not None:
            out.append(f"{keyword}={value.upper() if keyword == RET else value}")
    return out


def rcpt_params_to_send(params: Params, address: str) -> list[str]:
    """``NOTIFY=...`` and ``ORCPT=...`` for a RCPT command to a next hop that advertises DSN.

    Without an ORCPT of its own, an ASCII recipient gets ``ORCPT=rfc822;`` its
    address as received (RFC 3461 4.2 allows it; Postfix does the same), so the
    final report names the address the sender used.
    """
    out = []
    notify = param(params, NOTIFY)
    if notify is not None:
        out.append(f"NOTIFY={notify.upper()}")
    orcpt = param(params, ORCPT)
    if orcpt is not None:
        out.append(f"ORCPT={orcpt}")
    elif address.isascii():
        out.append(f"ORCPT=rfc822;{xtext_encode(address)}")
    return out
