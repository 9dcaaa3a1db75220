"""relay: a mail transfer agent on Twisted, run as an organisation's smart host.

Data flow, one direction:

    relay.smtp.server (inbound session) -> relay.queue.store (durable)
      -> relay.queue.scheduler (timers) -> relay.routing (per recipient)
      -> relay.delivery / relay.smtp.client -> relay.queue.store
"""

__version__ = "0.1.0"
