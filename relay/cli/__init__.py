"""Command-line tools for operators: ``relay-route`` (routing) and ``relay-queue`` (the spool)."""
