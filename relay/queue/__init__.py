"""The queue: the durable on-disk spool (``relay.queue.store``) and the timers
that decide when each queued message is attempted (``relay.queue.scheduler``)."""
