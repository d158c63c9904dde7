"""Reads wait for the writes sent before them (BrokerCore.after_durable): the corner cases of
that queue, without a network in the way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tq.broker.commands import Cancel
from tq.broker.core import BrokerCore, _PendingWait
from tq.config import BrokerConfig
from tq.errors import NotLeader


async def test_reads_behind_a_write_the_log_answers_at_once_still_run(tmp_path: Path) -> None:
    """A cluster node that stopped leading answers an append at once (NOT_LEADER): the reads
    queued behind that tick were released before they were moved to the waiting queue, and
    then waited for a later write that never came."""
    core = BrokerCore(BrokerConfig(port=0, data_dir=str(tmp_path), journal_bytes=1 << 20))
    core.start()
    try:

        def refuse(now: int, cmds: Any, done: Any) -> None:
            done(NotLeader("this node is not the leader"))

        core.log.append = refuse  # type: ignore[method-assign]
        replies: list[Any] = []
        core.submit(Cancel("x"), replies.append)
        read = asyncio.Event()
        core.after_durable(read.set)  # sent behind the write: queued for its tick
        await asyncio.wait_for(read.wait(), 5)
        assert isinstance(replies[0], NotLeader)
    finally:
        await core.drain()


def test_ending_a_pending_wait_says_whether_it_stopped_an_answer() -> None:
    """A wait withdrawn after it found its answer (its task final, the reply on its way) used
    to be uncounted twice by its connection, once by the withdrawal and once by the answer."""
    not_started = _PendingWait(lambda: None, None)
    assert not_started.end() is True  # it never starts, so no answer comes
    not_started.start()  # a no-op now

    answered = _PendingWait(lambda: None, None)  # began, and its answer was decided
    answered.start()
    assert answered.end() is False

    waiting = _PendingWait(lambda: lambda: True, None)  # began an open wait
    waiting.start()
    assert waiting.end() is True
    assert waiting.end() is False  # once
