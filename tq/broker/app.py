"""Composition root of the broker process: store + state machine + log + TCP (+ HTTP), and
signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import TYPE_CHECKING, Protocol

from tq.broker.core import BrokerCore
from tq.broker.tcp import TcpServer
from tq.config import BrokerConfig
from tq.logfields import kv

if TYPE_CHECKING:
    from tq.broker.http import HttpServer

log = logging.getLogger("tq.broker")


class Service(Protocol):
    """Something that runs beside the broker in its event loop (the CLI adds the SSH admin shell
    this way): started once TCP and HTTP are bound, stopped before the broker drains."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class BrokerApp:
    """A running broker. ``start()`` binds and recovers; ``stop()`` drains and closes cleanly."""

    def __init__(
        self, config: BrokerConfig, *, http_port: int | None = None, http_strict: bool = True
    ) -> None:
        self.config = config
        self.core = BrokerCore(config)
        self.tcp = TcpServer(self.core)
        self.port = 0
        # HTTP (REST, /metrics): None is off; 0 a free port; not ``http_strict``: a free port
        # when this one is taken (the default port must not stop a second broker on one host).
        self.http_port = http_port
        self.http_strict = http_strict
        self.http: HttpServer | None = None
        self.services: list[Service] = []

    async def start(self) -> int:
        self.core.start()
        # The broker's long-lived objects (indexes, leases) are built now; per-request objects
        # die young. Freezing what exists and collecting the young generation less often keeps
        # the cyclic GC from pausing the loop for milliseconds under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self.port = await self.tcp.start(self.config.host, self.config.port)
        self.core.start_replication(self.port)
        await self.core.replication_bound()
        if self.http_port is not None:
            from tq.broker.http import HttpServer  # aiohttp only when HTTP is on

            self.http = HttpServer(self.core, self.tcp)
            self.http_port = await self.http.start(
                self.config.host, self.http_port, strict=self.http_strict
            )
        for service in self.services:
            await service.start()
        return self.port

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.stop()
        self.tcp.stop_accepting()
        if self.http is not None:
            await self.http.stop_accepting()
        await self.core.drain()
        self.tcp.close_all()
        if self.http is not None:
            await self.http.close()

    async def serve_forever(self, ready_line: bool = True) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal store error (exit 1)."""
        port = await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready_line:
            # Tests and scripts wait for this exact line to learn the bound port.
            print(f"tq broker listening on {self.config.host}:{port}", flush=True)
            if self.http is not None:
                print(f"tq http listening on {self.config.host}:{self.http_port}", flush=True)
        log.info(
            "broker.started",
            extra=kv(host=self.config.host, port=port, data_dir=self.config.data_dir),
        )
        stopper = asyncio.ensure_future(stop.wait())
        fatal = asyncio.ensure_future(self.core.stopped.wait())
        await asyncio.wait({stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        fatal.cancel()
        if self.core.fatal is not None:
            log.critical("broker.fatal", extra=kv(error=str(self.core.fatal)))
            print(f"tq broker: fatal store error: {self.core.fatal}", file=sys.stderr)
            for service in reversed(self.services):
                await service.stop()
            self.tcp.stop_accepting()
            self.tcp.close_all()
            if self.http is not None:
                await self.http.close()
            return 1
        log.info("broker.stopping")
        await self.stop()
        log.info("broker.stopped")
        return 0
