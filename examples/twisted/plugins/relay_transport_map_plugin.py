"""Dropin: makes the transport-map router plugin visible to relay."""

from relay_transport_map import TransportMapFactory

transportMap = TransportMapFactory()
