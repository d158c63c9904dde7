"""A producer: submit a batch, wait for every result, print a summary.

    .venv/bin/tq worker --app examples/handlers.py          # in one terminal
    .venv/bin/python examples/producer.py [tcp://127.0.0.1:7700]

The broker address comes from the first argument, else ``TQ_BROKER``, else
``tcp://127.0.0.1:7700``. Exit code 0 when every task completed; 1 when one did not (a ``flaky``
task that failed all its attempts ends ``dead``); 2 when the address is not one or no broker
answers.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from tq import Client
from tq.errors import TqError, WaitTimeout


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else None  # None: TQ_BROKER or the default
    try:
        client = Client(url)  # reads the address; connects on `with`
    except ValueError as exc:  # not a broker address, e.g. "nonsense"
        print(f"producer: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with client:
        # One durable write for the whole batch; the ids come back in order.
        add_ids = client.submit_batch("add", [{"a": i, "b": i * i} for i in range(20)])
        # These fail ~30% of the time; each gets 3 retries with exponential backoff.
        flaky_ids = client.submit_batch(
            "flaky", [{"item": i, "fail_rate": 0.3} for i in range(10)], max_retries=3
        )
        # A single submit, served before the normal-priority ones still waiting.
        words_id = client.submit("text.wordcount", "to be or not to be", priority="high")
        print(f"submitted {len(add_ids) + len(flaky_ids) + 1} tasks")

        states: Counter[str] = Counter()
        retried = 0
        sums = []
        for tid in [*add_ids, *flaky_ids, words_id]:
            try:
                info = client.wait(tid, timeout_s=60)  # the broker pushes the final state
            except WaitTimeout:
                states["not finished"] += 1  # is a worker running?
                continue
            states[info.state] += 1
            retried += max(0, info.attempt - 1)
            if info.name == "add" and info.state == "completed":
                sums.append(info.result)
            elif info.state != "completed" and info.error is not None:
                print(
                    f"  {info.name} {info.id}: {info.state} after {info.attempt} attempts "
                    f"({info.error.type}: {info.error.message})"
                )

        words = client.status(words_id)
        print(f"add results: {sums}")
        print(f"wordcount: {words.result}")
        print(f"final states: {dict(states)}; retries needed: {retried}")
        print(f"broker totals: {client.stats()['states']}")
    print(f"done in {time.monotonic() - started:.1f}s")
    # The exit code says whether the work got done, so that `producer.py && next-step` stops
    # when it did not: a task that ended dead (it waits in the dead-letter queue for someone to
    # retry it) or did not finish is exit 1, as `tq submit --wait` exits 1 for a dead task.
    return 0 if set(states) == {"completed"} else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TqError as exc:  # e.g. BrokerUnavailable: no broker at that address
        print(f"producer: {exc.code}: {exc.message}", file=sys.stderr)
        sys.exit(2)
