"""The twistd dropin: ``twistd relay`` is ``relay.tap`` (named, so nothing of relay is imported here)."""

from twisted.application.service import ServiceMaker

relay = ServiceMaker("relay", "relay.tap", "A mail transfer agent: smart host and MX relay", "relay")
