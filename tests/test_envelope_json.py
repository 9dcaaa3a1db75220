"""Tests for the direct envelope JSON encoder: it writes what the dataclasses.asdict encoder wrote."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import Attempt, ClientInfo, Envelope, Recipient

FIXTURE = Path(__file__).parent / "fixtures" / "envelope-v1.json"


def asdict_json(envelope: Envelope) -> bytes:
    """The envelope JSON as the first encoder wrote it (dataclasses.asdict)."""
    return json.dumps(asdict(envelope), ensure_ascii=False, sort_keys=True).encode("utf-8")


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
                          remote=flag, reason=text, route="r", tls=text)
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
