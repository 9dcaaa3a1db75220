"""Tests for the client's transparency (RFC 5321 4.5.2): every line starting with "." is stuffed, however the message is cut."""

from __future__ import annotations

import io
import re

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import StringTransport

from relay.smtp.stream import DotStuffer, MessageProducer

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")

# Content rich in the bytes that matter: dots, CR, LF, NUL, next to each other.
_content = st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\x00", b"x", b" ", b".\r\n", b"\r\n."]),
                    max_size=60).map(b"".join) | st.binary(max_size=300)


def _expected_lines(data: bytes) -> list[bytes]:
    """The message's lines as a receiver must rebuild them: any line end read as CRLF."""
    normal = _LINE_ENDS.sub(b"\r\n", data)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    return normal.split(b"\r\n")[:-1]


def _check_wire(wire: bytes, data: bytes) -> None:
    """The wire holds CRLF line ends only, every "." line is stuffed, and unstuffing gives the message back."""
    assert wire.endswith(b".\r\n") and (wire == b".\r\n" or wire.endswith(b"\r\n.\r\n"))
    body = wire[:-3]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n"), "a bare CR or LF went on the wire"
    lines = body.split(b"\r\n")[:-1]
    for line in lines:
        assert not line.startswith(b".") or line.startswith(b".."), f"unstuffed line {line!r}"
    assert [line[1:] if line.startswith(b".") else line for line in lines] == _expected_lines(data)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@settings(max_examples=300, deadline=None)
@given(data=_content, cuts=st.lists(st.integers(0, 300), max_size=12))
def test_every_dot_line_stuffed_whatever_the_chunks(data: bytes, cuts: list[int]) -> None:
    """For any bytes (bare CR/LF included) cut anywhere, every line that starts with "." leaves stuffed and the data round-trips."""
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(piece) for piece in _cut(data, cuts)) + stuffer.finish()
    _check_wire(wire, data)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"x", b". ."]), max_size=40),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_queued_crlf_text_stuffed_whatever_the_chunks(lines: list[bytes], cuts: list[int]) -> None:
    """With crlf_only (queued mail), a "." after any chunk boundary (after CR, after CRLF, at the start) is stuffed."""
    data = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer(crlf_only=True)
    wire = b"".join(stuffer.feed(piece) for piece in _cut(data, cuts)) + stuffer.finish()
    _check_wire(wire, data)


@settings(max_examples=200, deadline=None)
@given(data=_content.map(lambda d: d.replace(b"\0", b"")), chunk_size=st.integers(1, 64), in_memory=st.booleans())
def test_message_producer_stuffs_every_dot_line(data: bytes, chunk_size: int, in_memory: bool) -> None:
    """The producer that streams a message to the next hop stuffs every "." line for any read size.

    (A message with a NUL is never streamed: see test_client's NulTests.)
    """
    transport = StringTransport()
    done: list[bool] = []
    producer = MessageProducer(io.BytesIO(data), transport, progress=lambda: None, done=lambda: done.append(True),
                               failed=lambda e: None, chunk_size=chunk_size, whole=in_memory)
    producer.start()
    for _ in range(10_000):
        if transport.producer is None:
            break
        transport.producer.resumeProducing()
    assert done == [True]
    _check_wire(transport.value(), data)


def test_message_producer_is_a_pull_producer() -> None:
    """MessageProducer declares IPullProducer (what the transport it registers with relies on)."""
    from twisted.internet.interfaces import IPullProducer
    from zope.interface.verify import verifyClass

    from relay.smtp.stream import MessageProducer

    assert IPullProducer.implementedBy(MessageProducer)
    verifyClass(IPullProducer, MessageProducer)
