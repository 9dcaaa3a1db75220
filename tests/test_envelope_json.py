"""Tests for the direct envelope JSON encoder: it writes what the dataclasses.asdict encoder wrote."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import FORMAT_VERSION, Attempt, ClientInfo, Envelope, Recipient

FIXTURE = Path(__file__).parent / "fixtures" / "envelope-v1.json"
OUTCOMES_V1 = Path(__file__).parent / "fixtures" / "envelope-v1-outcomes.json"


STORED_AS = {"body_type": "body", "rule": "route"}  # attributes renamed since, their stored keys kept


def stored_keys(value: Any) -> Any:
    """``value`` (asdict's output) with the renamed attributes under the keys the queue has always stored."""
    if isinstance(value, dict):
        return {STORED_AS.get(k, k): stored_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(stored_keys(v) for v in value)
    return value


def asdict_json(envelope: Envelope) -> bytes:
    """The envelope JSON as the first encoder wrote it (dataclasses.asdict), under the stored keys."""
    return json.dumps(stored_keys(asdict(envelope)), ensure_ascii=False, sort_keys=True).encode("utf-8")


class EncoderTests(SynchronousTestCase):
    def test_fixture_round_trips_and_matches_the_asdict_encoding(self) -> None:
        """The checked-in v1 envelope loads, and to_json writes what the asdict encoder wrote."""
        envelope = Envelope.from_json(FIXTURE.read_bytes())
        self.assertEqual(envelope.to_json(), asdict_json(envelope))
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)

    @settings(max_examples=60, deadline=None)
    @given(
        text=st.text(max_size=12),
        number=st.integers(min_value=0, max_value=10**6),
        when=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False)),
        flag=st.booleans(),
        hops=st.lists(st.text(max_size=6), max_size=3),
    )
    def test_any_envelope_encodes_as_asdict_did(self, text: str, number: int, when: Any, flag: bool,
                                                hops: list[str]) -> None:
        """Envelopes with any text, numbers, params, histories and flags encode byte for byte as before."""
        attempt = Attempt(time=when or 0.0, outcome="transient", code=number % 600, status=text, text=text, host=text,
                          remote=flag, reason=text, rule="r", tls=text)
        envelope = Envelope(
            queue_id="Q" + str(number),
            sender=text,
            recipients=(
                Recipient(address=text + "@example.org", source_route=tuple(hops),
                          params=(("NOTIFY", None), ("ORCPT", text)), attempts=number,
                          last_error=text, next_attempt=when, history=(attempt, attempt),
                          reported=flag, warned=not flag),
                Recipient(address="b@example.net"),
            ),
            client=ClientInfo(address="192.0.2.1", port=number % 65536, helo=text, trusted=flag, tls=text),
            arrival=when or 0.0, size=number, smtputf8=flag, mail_params=(("ENVID", text),), held=flag,
        )
        self.assertEqual(envelope.to_json(), asdict_json(envelope))
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)


class MigrationTests(SynchronousTestCase):
    """Version 1 envelopes (one line of text per attempt) read as version 2 (the attempt's facts)."""

    def history(self, envelope: Envelope, address: str) -> tuple[Attempt, ...]:
        return envelope.recipient(address).history

    def test_v1_history_lines_become_the_facts_of_each_attempt(self) -> None:
        """Each kind of line version 1 wrote is split once into code, status, text and whose words they are."""
        envelope = Envelope.from_json(OUTCOMES_V1.read_bytes())
        mx = "mx1.dest.example[192.0.2.25]"
        refused, greeting = self.history(envelope, "refused@dest.example")
        self.assertEqual(refused, Attempt(1700000000.0, "transient", 0, "4.4.1",
                                          f"connect to {mx}:25: Connection refused", mx, False, rule="mx"))
        self.assertEqual(greeting, Attempt(1700003600.0, "transient", 421, "4.7.0", "too many connections", mx, True,
                                           rule="mx"))
        [big] = self.history(envelope, "big@dest.example")
        self.assertEqual((big.code, big.status, big.remote, big.tls), (552, "5.3.4", False, "TLSv1.3 TLS_AES_256_GCM_SHA384"))
        self.assertEqual(big.text, "message size 20480 exceeds the remote server's limit of 10240 octets")
        [utf8] = self.history(envelope, "utf8@dest.example")
        self.assertEqual((utf8.code, utf8.status, utf8.remote), (550, "5.6.7", False))
        [dns] = self.history(envelope, "nobody@gone.example")
        self.assertEqual((dns.code, dns.status, dns.text, dns.remote), (0, "5.1.2", "DNS: domain gone.example does not exist", False))
        [reject] = self.history(envelope, "blocked@closed.example")
        self.assertEqual((reject.code, reject.status, reject.host, reject.remote), (550, "5.7.1", "", False))
        [unknown] = self.history(envelope, "unknown@dest.example")
        self.assertEqual((unknown.code, unknown.status, unknown.remote), (550, "5.1.1", True))
        self.assertEqual(unknown.text, "<unknown@dest.example>: Recipient address rejected")
        [plain] = self.history(envelope, "plain@dest.example")
        self.assertEqual((plain.code, plain.status, plain.text, plain.remote), (250, "", "Ok: queued as 4Tq9", True))

    def test_v1_reads_keep_everything_else_and_write_back_as_v2(self) -> None:
        """A migrated envelope keeps its recipients' states and errors, is written as version 2 and reads back equal."""
        raw = json.loads(OUTCOMES_V1.read_bytes())
        self.assertEqual(raw["version"], 1)
        envelope = Envelope.from_json(OUTCOMES_V1.read_bytes())
        self.assertEqual([(r.address, r.status, r.attempts, r.last_error) for r in envelope.recipients],
                         [(r["address"], r["status"], r["attempts"], r["last_error"]) for r in raw["recipients"]])
        self.assertTrue(envelope.recipient("big@dest.example").reported)
        written = json.loads(envelope.to_json())
        self.assertEqual(written["version"], FORMAT_VERSION)
        self.assertEqual(FORMAT_VERSION, 2)
        self.assertNotIn("reply", written["recipients"][0]["history"][0])
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)

    def test_v1_lines_read_back_as_they_were_written(self) -> None:
        """Attempt.reply of a migrated attempt is the v1 line again, but for the "said" and "relay:" forms."""
        raw = json.loads(OUTCOMES_V1.read_bytes())
        envelope = Envelope.from_json(OUTCOMES_V1.read_bytes())
        for stored, migrated in zip(raw["recipients"], envelope.recipients):
            for line, attempt in zip((a["reply"] for a in stored["history"]), migrated.history):
                if " said: " in line or " relay: " in line:
                    self.assertIn(attempt.text, line)
                else:
                    self.assertEqual(attempt.reply, line)

    def test_the_first_fixture_migrates_its_remote_replies(self) -> None:
        """The original v1 fixture's history (replies of gw1.example.net) becomes remote replies with their codes."""
        envelope = Envelope.from_json(FIXTURE.read_bytes())
        first, second = envelope.recipient("bob@legacy.example").history
        self.assertEqual((first.code, first.status, first.text, first.remote), (421, "4.4.2", "timeout", True))
        self.assertEqual((second.code, second.status, second.text), (451, "4.3.0", "try again later"))
