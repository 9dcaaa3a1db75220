"""A real downstream SMTP server for end-to-end tests: aiosmtpd on loopback.

``SMTPSink`` records every transaction it accepts (sender, recipients as
sent in RCPT, the exact data bytes) and can be told to answer RCPT or DATA
with a scripted reply, e.g. 451 twice and then accept; the data of a
transaction refused that way is kept in ``refused``.  aiosmtpd runs in its
own thread, so the relay under test (another process) talks to it over a
real socket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)


_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")


def _take_params(arg: str, keywords: tuple[str, ...]) -> tuple[str, list[str]]:
    """``arg`` without the parameters named in ``keywords``, and those parameters as sent."""
    kept, taken = [], []
    for word in arg.split(" "):
        (taken if word.split("=", 1)[0].upper() in keywords else kept).append(word)
    return " ".join(kept), taken


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP, recording each RCPT argument as sent (source routes included).

    With the sink's ``dsn`` on, it also takes the DSN parameters (RFC 3461),
    which aiosmtpd itself does not implement, and records them per command.
    """

    async def smtp_MAIL(self, arg):
        sink = self.event_handler.sink
        if sink.dsn and arg:
            arg, taken = _take_params(arg, _DSN_MAIL)
            sink.dsn_mail.append(taken)
        return await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        sink = self.event_handler.sink
        sink.raw_rcpts.append(arg)
        if sink.dsn and arg:
            arg, taken = _take_params(arg, _DSN_RCPT)
            sink.dsn_rcpt.append(taken)
        return await super().smtp_RCPT(arg)


class _SinkController(Controller):
    def factory(self):
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, sink: "SMTPSink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.sink.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_reply(address) if self.sink.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        reply = self.sink.data_reply() if self.sink.data_reply else None
        received = Received(
            sender=envelope.mail_from,
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content or envelope.content,
            mail_options=list(envelope.mail_options),
        )
        with self.sink.lock:
            (self.sink.refused if reply else self.sink.messages).append(received)
        return reply or "250 2.0.0 OK: queued by sink"


class SMTPSink:
    """An aiosmtpd server on ``host:port`` recording what it accepts."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        rcpt_reply: Optional[Callable[[str], Optional[str]]] = None,
        data_reply: Optional[Callable[[], Optional[str]]] = None,
        dsn: bool = False,
        **smtp_kwargs,
    ) -> None:
        from relayproc import free_port  # tests/ is on sys.path for test modules

        self.host = host
        self.port = port or free_port(host)
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.messages: list[Received] = []
        self.refused: list[Received] = []  # transactions answered with a scripted DATA reply
        self.raw_rcpts: list[str] = []
        self.dsn = dsn  # advertise DSN and take its parameters
        self.dsn_mail: list[list[str]] = []  # the DSN parameters of each MAIL
        self.dsn_rcpt: list[list[str]] = []  # the DSN parameters of each RCPT
        self.lock = threading.Lock()
        kwargs = {"decode_data": False, "enable_SMTPUTF8": True, **smtp_kwargs}
        self.controller = _SinkController(
            _Handler(self), hostname=host, port=self.port, server_hostname="sink.test",
            ready_timeout=10, **kwargs,
        )

    def start(self) -> "SMTPSink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Wait (bounded) until ``count`` messages arrived; returns them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"expected {count} messages at {self.host}:{self.port}, got {len(self.messages)}")

    def __enter__(self) -> "SMTPSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["SMTPSink", "Received", "SMTP"]
