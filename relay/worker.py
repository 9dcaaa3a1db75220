"""``python -m relay.worker``: one worker process, started by the master (see ``relay.workers``)."""

from relay.workers import worker_main

if __name__ == "__main__":
    worker_main()
