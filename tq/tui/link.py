"""The part of ``AsyncClient`` the dashboard uses, as a Protocol: the seam between ``tq top`` and
the broker. ``AsyncClient`` satisfies it as it is; the snapshot tests pass a fixed implementation
so the screens render the same every time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tq.client import TaskInfo
from tq.protocol.messages import WatchUpdate


class BrokerLink(Protocol):
    def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]: ...

    async def list_page(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[TaskInfo], str | None]: ...

    async def status(self, task_id: str) -> TaskInfo: ...

    async def cancel(self, task_id: str) -> TaskInfo: ...

    async def pause_queue(self, queue: str) -> None: ...

    async def resume_queue(self, queue: str) -> None: ...

    async def dead_letters(
        self,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        limit: int = 1000,
    ) -> list[TaskInfo]: ...

    async def retry_dead(
        self,
        task_ids: list[str] | None = None,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> list[str]: ...

    async def purge_dead(
        self,
        task_ids: list[str] | None = None,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> list[str]: ...

    async def close(self) -> None: ...
