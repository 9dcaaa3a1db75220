"""CHUNKING (RFC 3030): BDAT over the real protocol on a StringTransport.

Each test feeds bytes to the server as a client would (chunks pipelined or
not) and reads the replies; the fake spool of test_server shows what was
queued.  The same limits as DATA apply, and what is queued is always CRLF
text a next hop speaking only DATA reads as sent.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from relay.smtp.data import MAX_RECEIVED
from test_server import ready, spool_of

START = b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u@example.org>\r\n"
CONTENT = b"Subject: chunks\r\n\r\n.a line with a dot\r\n..two dots\r\nend\r\n"


def replies(out: bytes) -> list[str]:
    return [line[:9] for line in out.decode("utf-8").split("\r\n")[:-1]]


def queued_content(s) -> bytes:
    """What the one committed message holds after our Received header."""
    [message] = spool_of(s).committed
    data = bytes(message.data)
    assert data.startswith(b"Received: ")
    return data[data.index(b"\r\n", data.index(b"; ")) + 2:]


def test_ehlo_offers_chunking():
    """EHLO lists CHUNKING."""
    s = ready()
    assert b"250-CHUNKING\r\n" in s.send(b"EHLO client.test\r\n")


def test_one_last_chunk_queues_the_content_unchanged():
    """BDAT n LAST: exactly n octets, no dot-unstuffing, queued with a Received header; 250 after the commit."""
    s = ready()
    out = s.send(START + b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT)
    assert replies(out) == ["250 2.1.0", "250 2.1.5", "250 2.0.0"]
    assert queued_content(s) == CONTENT


def test_pipelined_chunks_then_bdat_0_last():
    """Chunks pipelined in one write each get "250 2.0.0 n octets received"; BDAT 0 LAST ends the message."""
    s = ready()
    a, b = CONTENT[:7], CONTENT[7:]
    out = s.send(START + b"BDAT 7\r\n" + a + b"BDAT %d\r\n" % len(b) + b + b"BDAT 0 LAST\r\n")
    lines = out.decode().split("\r\n")[:-1]
    assert lines[2] == "250 2.0.0 7 octets received"
    assert lines[3] == f"250 2.0.0 {len(b)} octets received"
    assert lines[4].startswith("250 2.0.0")
    assert queued_content(s) == CONTENT


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(CONTENT)), max_size=6), st.data())
def test_chunk_and_read_boundaries_do_not_change_the_result(cuts, data):
    """However the message is cut into chunks and the stream into reads, the same content is queued."""
    points = sorted(set(cuts))
    pieces = [CONTENT[i:j] for i, j in zip([0] + points, points + [len(CONTENT)])]
    stream = START + b"".join(b"BDAT %d\r\n" % len(p) + p for p in pieces[:-1])
    stream += b"BDAT %d LAST\r\n" % len(pieces[-1]) + pieces[-1]
    reads = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=len(stream) - 1), max_size=8))))
    s = ready()
    out = b""
    for i, j in zip([0] + reads, reads + [len(stream)]):
        out += s.send(stream[i:j])
    assert replies(out)[-1] == "250 2.0.0"
    assert queued_content(s) == CONTENT


def test_bdat_without_a_transaction_reads_the_chunk_and_refuses_it():
    """BDAT before MAIL is 503 5.5.1 after its octets are read, so they never run as commands."""
    s = ready()
    out = s.send(b"BDAT 18\r\nRSET\r\nQUIT\r\nXXXX\r\nNOOP\r\n")
    assert replies(out) == ["503 5.5.1", "250 2.0.0"]
    assert not s.closed


def test_bdat_without_recipients_is_refused():
    """BDAT after MAIL without an accepted RCPT is 503 5.5.1; nothing is queued."""
    s = ready()
    out = s.send(b"MAIL FROM:<s@x.test>\r\nBDAT 3 LAST\r\nabc")
    assert replies(out)[-1] == "503 5.5.1"
    assert spool_of(s).committed == []


def test_data_after_bdat_is_refused():
    """DATA in a transaction that began with BDAT is 503 5.5.1; RSET drops the begun message."""
    s = ready()
    out = s.send(START + b"BDAT 4\r\nabc\n" + b"DATA\r\nRSET\r\n")
    assert replies(out)[-2:] == ["503 5.5.1", "250 2.0.0"]
    assert [m.state for m in spool_of(s).messages] == ["aborted"]


def test_oversized_chunks_are_read_and_refused_at_the_end():
    """Past max_message_size the chunks are still read (memory bounded), then 552 5.3.4; nothing queued."""
    s = ready(max_message_size=1000)
    chunk = b"x" * 500 + b"\r\n"
    out = s.send(START + (b"BDAT %d\r\n" % len(chunk) + chunk) * 3 + b"BDAT 0 LAST\r\n")
    assert replies(out)[-1] == "552 5.3.4"
    [message] = spool_of(s).messages
    assert message.state == "aborted" and len(message.data) < 1500


def test_bare_line_ends_and_nul_are_refused():
    """A bare LF, a bare CR or a NUL in BDAT content is 554 5.6.0, as in DATA: it cannot smuggle a message."""
    for content in (b"a\nMAIL FROM:<x>\r\n", b"a\r.\rb\r\n", b"a\0.\r\n"):
        s = ready()
        out = s.send(START + b"BDAT %d LAST\r\n" % len(content) + content)
        assert replies(out)[-1] == "554 5.6.0", content
        assert spool_of(s).committed == []


def test_final_line_without_crlf_gets_one():
    """Content whose last line lacks CRLF is queued with one, so the stored text stays CRLF-only."""
    s = ready()
    s.send(START + b"BDAT 13 LAST\r\nSubject: x\r\nb")
    assert queued_content(s) == b"Subject: x\r\nb\r\n"


def test_too_many_received_headers_are_a_loop():
    """The loop check of DATA counts Received fields in BDAT content too."""
    s = ready()
    content = b"Received: from a by b\r\n" * (MAX_RECEIVED + 1) + b"\r\nbody\r\n"
    out = s.send(START + b"BDAT %d LAST\r\n" % len(content) + content)
    assert replies(out)[-1].startswith("554")
    assert spool_of(s).committed == []


def test_bad_bdat_syntax():
    """BDAT without a size, with a bad size or a word other than LAST is 501 5.5.4."""
    for line in (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 FIRST\r\n", b"BDAT -1\r\n"):
        s = ready()
        assert replies(s.send(START + line))[-1] == "501 5.5.4", line
