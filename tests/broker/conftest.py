"""Fixtures of the state-machine tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tq.broker.state import StateMachine
from tq.store import Store


@pytest.fixture
def sm(tmp_path: Path) -> Iterator[StateMachine]:
    """A state machine over a fresh store in ``tmp_path``, recovered (empty) and ready."""
    store = Store(str(tmp_path / "store"))
    store.open()
    machine = StateMachine(store)
    machine.recover()
    yield machine
    store.close()
