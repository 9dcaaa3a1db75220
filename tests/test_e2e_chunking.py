"""End to end: a raw-socket BDAT client through a real twistd to an aiosmtpd next hop speaking DATA.

The octets of a message sent in pipelined BDAT chunks (lines starting with
dots included) arrive at the next hop exactly as sent, after relay's
Received header; a chunked message with a bare LF is refused and never
reaches it.
"""

from __future__ import annotations

import socket

import pytest

from relayproc import RelayProcess, free_port
from smtpsink import SMTPSink

BODY = b"Subject: chunked\r\nFrom: app@client.test\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nlast line\r\n"


@pytest.fixture
def world(tmp_path, request):
    port = free_port("127.0.0.2")
    sink = SMTPSink("127.0.0.2", port).start()
    request.addfinalizer(sink.stop)
    relay = RelayProcess(tmp_path / "relay", f'''
hostname = "relay.test"
[delivery]
port = {port}

[[routes]]
domains = ["dest.test"]
smarthost = "127.0.0.2"
''')
    request.addfinalizer(relay.kill)
    relay.start()
    return relay, sink


class Client:
    """A minimal pipelining SMTP client over a socket, reading reply lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        """One whole reply; its last line."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


def send_chunks(port: int, chunks: list[bytes]) -> list[bytes]:
    client = Client(port)
    assert client.reply().startswith(b"220")
    client.sock.sendall(b"EHLO client.test\r\n")
    ehlo = []
    while True:
        line = client.line()
        ehlo.append(line)
        if line[3:4] != b"-":
            break
    assert b"250-CHUNKING" in ehlo
    stream = b"MAIL FROM:<app@client.test>\r\nRCPT TO:<u@dest.test>\r\n"
    for i, chunk in enumerate(chunks):
        stream += b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
    client.sock.sendall(stream)  # everything pipelined in one write
    answers = [client.reply() for _ in range(2 + len(chunks))]
    client.close()
    return answers


def test_pipelined_chunks_arrive_exactly_at_a_data_next_hop(world):
    """Three pipelined BDAT chunks are queued and relayed over DATA with every octet as sent."""
    relay, sink = world
    answers = send_chunks(relay.port, [BODY[:10], BODY[10:50], BODY[50:]])
    assert [a[:3] for a in answers] == [b"250"] * 5
    [message] = sink.wait_for(1)
    assert message.recipients == ["u@dest.test"]
    assert message.data.endswith(BODY)
    assert message.data.startswith(b"Received: from client.test")


def test_chunked_message_with_a_bare_lf_is_refused(world):
    """A bare LF in BDAT content is refused at the last chunk with 554 5.6.0."""
    relay, sink = world
    answers = send_chunks(relay.port, [b"Subject: x\r\n\r\nhidden\n.\nMAIL FROM:<a@b>\r\n"])
    assert answers[-1].startswith(b"554 5.6.0")
