"""``relay-queue`` output: queued messages as the operator reads them, and as JSON.

This module owns how the tool shows a message: the block of one message in
``list`` (``list_human``) and its stable JSON object (``list_json``), the
full view of ``show`` (``show_human``, ``show_json``), each recipient and
each attempt (``recipient_json``, ``attempt_json``, ``attempt_words``,
``last_words``), and the small helpers every output line uses (ages, sizes,
local times, plurals, one-line error text).  It takes envelopes and returns
text or JSON-ready values; it reads no file and writes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from relay.envelope import DELIVERED, FAILED, PENDING, Attempt, Envelope, Recipient

HEADER_LIMIT = 1024 * 1024  # octets of header section shown by ``show``


# -- formatting helpers ------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``42s``, ``5m``, ``2h``, ``3d`` (rounded down; never negative)."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_size(octets: int) -> str:
    """``812B``, ``4.1kB``, ``35.0MB`` (decimal units, as in the configuration)."""
    if octets < 1000:
        return f"{octets}B"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if octets >= size:
            return f"{octets / size:.1f}{unit}"
    return f"{octets}B"  # not reached


def local_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def sender_text(sender: str) -> str:
    return f"<{sender}>"


def next_attempt_text(recipient: Recipient, held: bool, now: float) -> str:
    if held:
        return "held"
    when = recipient.next_attempt
    if when is None or when <= now:
        return "due now"
    clock = time.strftime("%H:%M" if when - now < 86400 else "%Y-%m-%d %H:%M", time.localtime(when))
    return f"next in {human_duration(when - now)} ({clock})"


def one_line(text: str) -> str:
    return " ".join(text.split())


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return one_line(str(error)) or type(error).__name__


# -- list ----------------------------------------------------------------------------


def list_human(envelope: Envelope, now: float) -> str:
    """The block for one message: a head line, then one line per pending recipient."""
    head = [
        envelope.queue_id,
        f"{human_duration(now - envelope.arrival):>4}",
        f"{human_size(envelope.size):>7}",
        sender_text(envelope.sender),
    ]
    if envelope.held:
        head.append("HELD")
    lines = ["  ".join(head)]
    for r in envelope.pending():
        parts = [r.status, plural(r.attempts, "attempt"), next_attempt_text(r, envelope.held, now)]
        line = f"    {r.address}  {', '.join(parts)}"
        last = last_words(r)
        if last:
            line += f"  last: {last}"
        lines.append(line)
    done = [
        f"{count} {state}"
        for state in (DELIVERED, FAILED)
        if (count := sum(1 for r in envelope.recipients if r.status == state))
    ]
    if done:
        lines.append(f"    ({', '.join(done)})")
    return "\n".join(lines) + "\n"


def recipient_json(recipient: Recipient) -> dict[str, Any]:
    return {
        "address": recipient.address,
        "status": recipient.status,
        "attempts": recipient.attempts,
        "last_error": recipient.last_error,
        "next_attempt": recipient.next_attempt,
        "last_attempt": attempt_json(recipient.history[-1]) if recipient.history else None,
    }


def attempt_json(a: Attempt) -> dict[str, Any]:
    """One attempt's facts; ``reply`` is the one line they make (as version 1 stored it)."""
    return {
        "time": a.time, "outcome": a.outcome, "host": a.host, "route": a.rule, "code": a.code,
        "status": a.status, "text": a.text, "remote": a.remote, "reason": a.reason, "tls": a.tls,
        "tls_fallback": a.tls_fallback, "dsn_passed": a.dsn_passed, "reply": a.reply,
    }


def attempt_words(a: Attempt) -> str:
    """An attempt's words, saying whose: the remote reply as sent, or "relay: ..." with the reason."""
    if a.remote:
        return one_line(a.reply)
    return f"relay: {one_line(a.reply)}" + (f" ({a.reason})" if a.reason else "")


def last_words(r: Recipient) -> str:
    """The last attempt's words, for a recipient that has not been delivered."""
    if r.status == DELIVERED:
        return ""
    if r.history and r.history[-1].outcome != DELIVERED:
        return attempt_words(r.history[-1])
    return one_line(r.last_error)


def list_json(envelope: Envelope) -> dict[str, Any]:
    """The stable JSON object of one message in ``list --json``."""
    return {
        "id": envelope.queue_id,
        "sender": envelope.sender,
        "arrival": envelope.arrival,
        "size": envelope.size,
        "held": envelope.held,
        "recipients": [recipient_json(r) for r in envelope.recipients],
    }


# -- show ----------------------------------------------------------------------------


def show_json(envelope: Envelope, headers: list[str], truncated: bool) -> dict[str, Any]:
    client = envelope.client
    return {
        **list_json(envelope),
        "body": envelope.body_type,
        "smtputf8": envelope.smtputf8,
        "client": {
            "address": client.address,
            "port": client.port,
            "helo": client.helo,
            "protocol": client.protocol,
            "trusted": client.trusted,
            "auth_user": client.auth_user,
            "tls": client.tls,
        },
        "recipients": [
            {
                **recipient_json(r),
                "history": [attempt_json(a) for a in r.history],
            }
            for r in envelope.recipients
        ],
        "headers": headers,
        "headers_truncated": truncated,
    }


def show_human(envelope: Envelope, headers: list[str], truncated: bool, now: float) -> str:
    client = envelope.client
    where = client.address or "unknown"
    if client.port:
        where += f" port {client.port}"
    about = [f"helo {client.helo or '-'}", client.protocol]
    if client.trusted:
        about.append("trusted")
    if client.auth_user:
        about.append(f"authenticated as {client.auth_user}")
    if client.tls:
        about.append(client.tls)
    lines = [
        f"queue id:  {envelope.queue_id}",
        f"sender:    {sender_text(envelope.sender)}",
        f"arrival:   {local_time(envelope.arrival)} ({human_duration(now - envelope.arrival)} ago)",
        f"size:      {envelope.size} octets",
        f"client:    {where}, {', '.join(about)}",
        f"body:      {envelope.body_type}, smtputf8 {'yes' if envelope.smtputf8 else 'no'}",
        f"held:      {'yes' if envelope.held else 'no'}",
        "recipients:",
    ]
    for r in envelope.recipients:
        lines.extend(_recipient_block(r, envelope.held, now))
    lines.append("headers:")
    lines.extend(f"  {line}" for line in headers)
    if truncated:
        lines.append(f"  [header section longer than {HEADER_LIMIT} octets: cut here]")
    return "\n".join(lines) + "\n"


def _recipient_block(r: Recipient, held: bool, now: float) -> list[str]:
    state = [r.status, plural(r.attempts, "attempt")]
    if r.status == PENDING:
        state.append(next_attempt_text(r, held, now))
    lines = [f"  {r.address}: {', '.join(state)}"]
    if r.source_route:
        lines.append(f"    source route: {','.join('@' + hop for hop in r.source_route)}")
    last = last_words(r)
    if last:
        lines.append(f"    last error: {last}")
    for a in r.history:
        where = f" {a.host}" if a.host else ""
        rule = f" [{a.rule}]" if a.rule else ""
        tls = f" ({a.tls})" if a.tls else (" (in clear after a failed TLS handshake)" if a.tls_fallback else "")
        lines.append(f"    {local_time(a.time)}  {a.outcome}{where}{rule}{tls}: {attempt_words(a)}")
    return lines
