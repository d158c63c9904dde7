"""The core's Tick timer: one Tick in flight at a time, and a failed Tick is retried after a pause,
not at once (the state still says a Tick is due until one is applied)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from tq.broker.commands import Command, Tick
from tq.broker.core import TICK_RETRY_S, BrokerCore
from tq.config import BrokerConfig
from tq.errors import TqError


async def test_a_failing_tick_is_retried_after_a_pause_not_in_a_loop(tmp_path: Path) -> None:
    core = BrokerCore(BrokerConfig(port=0, data_dir=str(tmp_path), journal_bytes=1 << 20))
    core.start()
    ticks: list[float] = []
    fourth = asyncio.Event()
    loop = asyncio.get_running_loop()

    def submit(cmd: Command, reply: Any) -> None:  # every Tick fails, as with a full Raft queue
        assert isinstance(cmd, Tick)
        ticks.append(loop.time())
        if len(ticks) == 4:
            fourth.set()
        reply(TqError("replication failed: queue full"))

    core.submit = submit  # type: ignore[method-assign]
    core.sm.next_deadline_ms = lambda: 0  # type: ignore[method-assign]  (always due)
    try:
        core._arm_timer()
        await asyncio.wait_for(fourth.wait(), 30)  # without the pause: thousands at once
        # one per pause, not one per loop iteration
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert all(gap >= TICK_RETRY_S * 0.9 for gap in gaps), gaps
    finally:
        await core.drain()
