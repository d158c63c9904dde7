"""A read sent right after a write sees it in a cluster too, where a write appended to the log
is applied only once a majority has it (tests/integration/test_read_your_writes.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.cluster.conftest import MakeCluster
from tests.integration.test_read_your_writes import reads_see_the_write_before_them

pytestmark = pytest.mark.cluster


def test_a_read_sent_after_a_write_sees_it_on_the_leader(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    rc, status = cluster.status_cli()
    assert rc == 0, status
    asyncio.run(reads_see_the_write_before_them(status["leader"]))
