"""Frozen configuration for the broker and worker; the only place that reads ``TQ_*`` variables.

Precedence: CLI flag > ``TQ_*`` environment variable > defaults. Values are validated once here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

N = TypeVar("N", int, float)

DEFAULT_BROKER_URL = "tcp://127.0.0.1:7700"
DEFAULT_PORT = 7700
DEFAULT_FRAME_LIMIT = 16 * 1024 * 1024
# tq broker --spin-us: above the ~100-150 µs a sequential client takes here to answer a reply
# with its next request, and the journal write's usual time.
SPIN_US = 250
MAX_WAIT_S = 366 * 86400.0  # a wait longer than a year is a mistake (or inf, which has no ms)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "./.tq-data"
    max_frame_bytes: int = DEFAULT_FRAME_LIMIT
    lease_s: float = 30.0
    heartbeat_timeout_s: float = 10.0
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    retention_s: float = 7 * 24 * 3600.0
    retention_interval_s: float = 60.0
    auth_token: str | None = None
    hello_timeout_s: float = 10.0  # a connection that has not said hello by then is closed
    max_connections: int = 0  # TCP connections taken at once; 0: the descriptor limit less 256
    journal_bytes: int = 64 * 1024 * 1024  # single node: the commit journal's size (--journal-mb)
    # Single node: poll this long (µs) for the next request and for the journal's write before
    # sleeping (tq/spin.py); 0 never polls. ``tq broker`` passes SPIN_US; the default here is 0
    # for a broker embedded beside its clients in one event loop, where a poll holds the very
    # loop that would send the next request.
    spin_us: int = 0
    # Single node: keep the event loop's thread off the CPUs that take the data disk's
    # interrupts (tq/broker/placement.py). ``tq broker`` turns it on; off here, for the same
    # reason as spin_us, and so that tests embedding brokers do not pin their own thread.
    avoid_irq_cpus: bool = False
    # cluster mode (a Raft port given): this node's id, its Raft port, the other members' Raft
    # addresses, where the Raft port really listens (default: host:raft_port) and the secret
    raft_port: int | None = None
    node_id: str = ""
    peers: tuple[str, ...] = ()
    raft_bind: str | None = None
    raft_secret: str | None = None
    compaction_min_entries: int = 5000

    @property
    def clustered(self) -> bool:
        return self.raft_port is not None


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker: str = DEFAULT_BROKER_URL
    concurrency: int = 8
    queues: tuple[str, ...] = ("default",)
    heartbeat_s: float = 2.0
    grace_s: float = 30.0
    apps: tuple[str, ...] = field(default_factory=tuple)
    burst: bool = False


def broker_url_from_env(explicit: str | None = None) -> str:
    """``--broker`` wins, then ``TQ_BROKER``, then the default local broker."""
    return explicit or os.environ.get("TQ_BROKER") or DEFAULT_BROKER_URL


DEFAULT_JOURNAL_MB = 64
MAX_JOURNAL_MB = 4096


def journal_mb_from_env(explicit: int | None = None) -> int:
    """``--journal-mb`` wins, then ``TQ_JOURNAL_MB``, then 64 (MiB of commit journal)."""
    if explicit is not None:
        return explicit
    return _env_number("TQ_JOURNAL_MB", int, DEFAULT_JOURNAL_MB, 1, MAX_JOURNAL_MB, "MiB")


def _env_number(name: str, kind: type[N], default: N, low: N, high: N, unit: str) -> N:
    """``$name`` as a number from ``low`` to ``high`` (``default`` when unset or empty); a bad
    value is a ``ValueError`` naming the variable."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not {what} of {unit}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ValueError(f"{name}={raw} is outside {low}..{high} {unit}")
    return value


DEFAULT_CONNECT_TIMEOUT_S = 10.0


def connect_timeout_from_env(explicit: float | None = None) -> float:
    """``connect_timeout_s`` wins, then ``TQ_CONNECT_TIMEOUT``, then 10 (seconds a client keeps
    trying to reach a broker): a script can fail fast without a code change."""
    if explicit is not None:
        return explicit
    return _env_number(
        "TQ_CONNECT_TIMEOUT", float, DEFAULT_CONNECT_TIMEOUT_S, 0.0, 3600.0, "seconds"
    )


def auth_token_from_env() -> str | None:
    """``TQ_TOKEN``: the shared token a broker requires and a client presents (empty: none)."""
    return os.environ.get("TQ_TOKEN") or None


def parse_broker_url(url: str) -> list[tuple[str, int]]:
    """``tcp://h:p[,tcp://h:p...]`` (scheme optional) to a list of addresses."""
    out: list[tuple[str, int]] = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" in part:
            scheme, _, part = part.partition("://")
            if scheme != "tcp":
                raise ValueError(f"unsupported broker scheme {scheme!r} (use tcp://host:port)")
        if "@" in part:
            # Not echoed: what precedes the @ is likely a password, and errors reach logs.
            raise ValueError(
                "a broker address takes no user or password (tcp://host:port; set TQ_TOKEN)"
            )
        host, sep, port = part.rpartition(":")
        if not sep or not host:
            raise ValueError(f"broker address {part!r} is not host:port")
        try:
            out.append((host, int(port)))
        except ValueError:
            raise ValueError(f"broker port {port!r} is not a number") from None
    if not out:
        raise ValueError("no broker address given")
    return out
