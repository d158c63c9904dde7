"""A small workflow: fan out ``resize`` tasks, then one ``summarize`` step over their results.

    .venv/bin/tq worker --app examples/handlers.py          # in one terminal
    .venv/bin/python examples/workflow.py [tcp://127.0.0.1:7700]

tq has no task dependencies: the workflow lives in the producer. It submits the fan-out as one
batch, waits for every task concurrently (``AsyncClient`` multiplexes all the waits over one
connection and the broker pushes each result as it lands; nothing polls), and submits the
``summarize`` step only once the whole batch has finished. Exit code 0 when the summary is
done, 1 when the ``summarize`` task did not complete, 2 when the address is not one or no broker
answers.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tq import AsyncClient
from tq.errors import TqError

IMAGES = [
    {"image": f"photo-{i:03d}.jpg", "width": 4000 - 100 * i, "height": 3000 + 50 * i}
    for i in range(12)
]


async def run(client: AsyncClient) -> dict[str, Any]:
    async with client:
        # 1. Fan out: one durable write for the whole batch.
        ids = await client.submit_batch(
            "resize", [{**image, "max_side": 512} for image in IMAGES], max_retries=2
        )
        print(f"fan-out: {len(ids)} resize tasks submitted")

        # 2. Fan in: wait for all of them at once.
        infos = await asyncio.gather(*(client.wait(tid, timeout_s=60) for tid in ids))
        done = [info.result for info in infos if info.state == "completed"]
        failed = [info.id for info in infos if info.state != "completed"]
        print(f"fan-in: {len(done)} resized, {len(failed)} did not complete")

        # 3. The next step gets the results of the previous one as its payload.
        summary_id = await client.submit(
            "summarize", {"results": done, "failed": failed}, priority="high"
        )
        summary = await client.wait(summary_id, timeout_s=60)
        if summary.state != "completed":
            raise SystemExit(f"summarize ended {summary.state}: {summary.error}")
        result: dict[str, Any] = summary.result
        return result


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else None  # None: TQ_BROKER or the default
    try:
        client = AsyncClient(url)  # reads the address; connects in run()
    except ValueError as exc:  # not a broker address, e.g. "nonsense"
        print(f"workflow: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(client))
    except TqError as exc:
        print(f"workflow: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    print(f"summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
