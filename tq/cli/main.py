"""``tq``: broker, worker and admin tool in one executable.

Every client command takes ``--broker`` (or ``TQ_BROKER``) and ``-o table|json|yaml``. Errors are
one readable line on stderr with exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from tq.cli.cancel import run as run_cancellable
from tq.cli.output import (
    Format,
    OutputOpt,
    emit_data,
    emit_table,
    err_console,
    error_line,
    fail,
    say,
    short,
    stderr,
    when,
)
from tq.config import (
    MAX_JOURNAL_MB,
    MAX_WAIT_S,
    SPIN_US,
    BrokerConfig,
    auth_token_from_env,
    broker_url_from_env,
    journal_mb_from_env,
    parse_broker_url,
)
from tq.spin import CLIENT_SPIN_US, MAX_CLIENT_SPIN_US

if TYPE_CHECKING:
    from tq.broker.app import BrokerApp

T = TypeVar("T")

app = typer.Typer(
    name="tq",
    help="tq: a durable, fast task queue. Broker, worker and admin tool in one command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BrokerOpt = typer.Option(None, "--broker", "-b", help="tcp://host:port[,...] (env TQ_BROKER)")


LogFormatOpt = typer.Option(
    "auto", "--log-format", help="auto (console on a terminal, else json), console or json"
)


def _setup_logging(level: str, fmt: str = "auto") -> None:
    from tq.cli.logfmt import setup_logging

    if fmt not in ("auto", "console", "json"):
        fail("--log-format must be auto, console or json", code=2)
    setup_logging(level, fmt)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run_client(fn: Callable[[Any], Awaitable[T]], broker: str | None) -> T:
    """Run one client coroutine; every tq error becomes one line and exit code 1."""
    from tq.client import AsyncClient
    from tq.errors import BrokerUnavailable, TqError

    async def main() -> T:
        # spin_us=0: a command makes a request or a few, and the SSH shell runs commands inside
        # the broker's process, where polling for a reply competes for the GIL with the thread
        # that must answer it (a review measured p50 0.59 / 0.63 ms polling, 0.54 / 0.59 not).
        async with AsyncClient(broker, connect_timeout_s=2.0, spin_us=0) as client:
            return await fn(client)

    try:
        return run_cancellable(main())
    except BrokerUnavailable as exc:
        fail(f"{exc.message} (is `tq broker` running? set --broker or TQ_BROKER)")
    except TqError as exc:
        fail(f"{exc.code}: {exc.message}")
    except ValueError as exc:
        fail(str(exc), code=2)


# --- servers -------------------------------------------------------------------------------------


def _check_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # NaN fails this too
        fail(f"{option} must be from {low:g} to {high:g}, not {value}", code=2)


def _broker_config(
    host: str,
    port: int,
    data_dir: str,
    lease_s: float,
    retention_s: float,
    retry_base_s: float,
    heartbeat_timeout_s: float,
    max_frame_bytes: int,
    journal_mb: int | None = None,
    **cluster: Any,
) -> BrokerConfig:
    try:
        journal_bytes = journal_mb_from_env(journal_mb) * 1024 * 1024
    except ValueError as exc:
        fail(str(exc), code=2)
    # Checked here, in one readable line each: NaN or inf reached the timers as a traceback,
    # --retention-interval 0 made an idle broker spin on a core, --max-frame 0 refused even hello.
    _check_range("--lease", lease_s, 0.1, 86_400 * 7)
    _check_range("--heartbeat-timeout", heartbeat_timeout_s, 0.1, 86_400)
    _check_range("--retry-base", retry_base_s, 0.0, 86_400)
    _check_range("--retention", retention_s, 0.0, 86_400 * 3650)
    _check_range("--retention-interval", cluster.get("retention_interval_s", 60.0), 0.1, 86_400)
    _check_range("--max-frame", max_frame_bytes, 1024, 1024 * 1024 * 1024)
    _check_range("--hello-timeout", cluster.get("hello_timeout_s", 10.0), 0.1, 3600)
    _check_range("--max-connections", cluster.get("max_connections", 0), 0, 10_000_000)
    _check_range(
        "--raft-compaction-entries", cluster.get("compaction_min_entries", 5000), 100, 10_000_000
    )
    return BrokerConfig(
        journal_bytes=journal_bytes,
        host=host,
        port=port,
        data_dir=data_dir,
        lease_s=lease_s,
        retention_s=retention_s,
        retry_base_s=retry_base_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
        max_frame_bytes=max_frame_bytes,
        auth_token=auth_token_from_env(),
        **cluster,
    )


def _check_host_port(what: str, address: str) -> None:
    """A Raft address must be ``host:port`` with a host and a port from 1 to 65535: a bad one
    (port 0 or 70000, no host) used to pass `isdigit` and only failed later, at connect time."""
    host, sep, port = address.rpartition(":")
    # isascii: str.isdigit also accepts digits such as "²", which int() refuses
    if not (sep and host.strip() and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        fail(f"{what} is not host:port (a host, and a port from 1 to 65535)", code=2)


def _cluster_options(
    node_id: str | None,
    raft_port: int | None,
    peers: str | None,
    raft_bind: str | None,
    raft_secret_file: str | None,
) -> dict[str, Any]:
    if raft_port is None:
        if peers or raft_bind or raft_secret_file:
            fail("--peers, --raft-bind and --raft-secret-file need --raft-port", code=2)
        return {}
    peer_list = tuple(p.strip() for p in (peers or "").split(",") if p.strip())
    for peer in peer_list:  # first: a usage error is the only line on stderr, before any warning
        _check_host_port(f"--peers entry {peer!r}", peer)
    secret = None
    if raft_secret_file:
        try:
            with open(raft_secret_file, encoding="utf-8") as fh:
                secret = fh.read().strip()
                mode = os.fstat(fh.fileno()).st_mode
        except OSError as exc:
            fail(f"cannot read --raft-secret-file: {exc.strerror}", code=2)
        except UnicodeDecodeError:
            fail("--raft-secret-file is not UTF-8 text", code=2)
        if not secret:
            fail("--raft-secret-file is empty", code=2)
        if mode & 0o077:
            logging.getLogger("tq.cli").warning(
                "cluster.secret_file_readable: --raft-secret-file can be read by other users "
                "(chmod 600 it)"
            )
    else:
        logging.getLogger("tq.cli").warning(
            "cluster.no_secret: Raft traffic is not encrypted; keep the Raft port private "
            "or pass --raft-secret-file"
        )
    return {
        "raft_port": raft_port,
        "node_id": node_id or "",
        "peers": peer_list,
        "raft_bind": raft_bind,
        "raft_secret": secret,
    }


def _check_cluster_members(
    data_dir: str, host: str, raft_port: int, peers: tuple[str, ...]
) -> None:
    """A node restarted with other ``--peers`` than its Raft data records stops here, with one
    line and exit code 2, before it opens anything (tq/broker/cluster.py ``check_members``)."""
    from tq.broker.cluster import MembersMismatch, check_members, raft_dir

    try:
        # the Raft address the node advertises: host:raft-port, as the broker core builds it
        check_members(raft_dir(data_dir), f"{host}:{raft_port}", list(peers))
    except MembersMismatch as exc:
        fail(str(exc), code=2)


DEFAULT_HTTP_PORT = 7701
JournalOpt = typer.Option(
    None,
    "--journal-mb",
    min=1,
    max=MAX_JOURNAL_MB,
    help="single node: commit journal size in MiB (default 64, or TQ_JOURNAL_MB)",
)
HttpPortOpt = typer.Option(
    None,
    "--http-port",
    min=-1,
    max=65535,
    help="HTTP API and /metrics (default 7701, a free port if taken; 0 picks one; -1 is off)",
)


def _http_options(http_port: int | None) -> dict[str, Any]:
    """``--http-port``: unset is 7701 (or a free port when 7701 is taken), 0 a free port, -1 no
    HTTP; a port given explicitly must be bound."""
    if http_port is None:
        return {"http_port": DEFAULT_HTTP_PORT, "http_strict": False}
    return {"http_port": None if http_port < 0 else http_port, "http_strict": True}


SshPortOpt = typer.Option(
    None,
    "--ssh-port",
    min=0,
    max=65535,
    help="admin shell over SSH on this port (0 picks one; off unless given): docs/ssh.md",
)
SshKeysOpt = typer.Option(
    None, "--ssh-authorized-keys", help="OpenSSH authorized_keys file of the admin keys"
)
SshReadonlyOpt = typer.Option(
    None, "--ssh-readonly-keys", help="authorized_keys file of keys that may only look"
)


def _add_ssh(
    broker_app: BrokerApp, port: int | None, admin_keys: str | None, readonly_keys: str | None
) -> None:
    """``--ssh-port``: the SSH admin shell as a service of the broker (tq/cli/sshd.py)."""
    if port is None:
        if admin_keys or readonly_keys:
            fail("--ssh-authorized-keys and --ssh-readonly-keys need --ssh-port", code=2)
        return
    if not admin_keys:
        fail("--ssh-port needs --ssh-authorized-keys", code=2)
    from tq.cli.sshd import SshServer, read_keys

    try:
        keys = read_keys(admin_keys, admin=True)
        if readonly_keys:
            keys += read_keys(readonly_keys, admin=False)
    except ValueError as exc:
        fail(str(exc), code=2)
    broker_app.services.append(SshServer(broker_app, port, keys))


@app.command()
def broker(
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
    port: int = typer.Option(7700, help="TCP protocol port (0 picks a free one)"),
    data_dir: str = typer.Option("./.tq-data", help="where the embedded store lives"),
    lease: float = typer.Option(30.0, "--lease", help="lease seconds, extended by heartbeats"),
    retention: float = typer.Option(7 * 86400, "--retention", help="keep finished tasks (s)"),
    retention_interval: float = typer.Option(
        60.0, "--retention-interval", help="how often retention runs (s)"
    ),
    retry_base: float = typer.Option(1.0, "--retry-base", help="first retry delay (s)"),
    heartbeat_timeout: float = typer.Option(
        10.0, "--heartbeat-timeout", help="a worker silent this long (s) is declared dead"
    ),
    max_frame: int = typer.Option(16 * 1024 * 1024, "--max-frame", help="largest frame (bytes)"),
    hello_timeout: float = typer.Option(
        10.0, "--hello-timeout", help="close a connection silent this long (s) before its hello"
    ),
    max_connections: int = typer.Option(
        0, "--max-connections", help="TCP connections at once (0: the file limit less 256)"
    ),
    journal_mb: int | None = JournalOpt,
    spin_us: int = typer.Option(
        SPIN_US,
        "--spin-us",
        min=0,
        max=10_000,
        help="single node: poll this long (µs) for the next request and the journal write "
        "before sleeping; 0 never polls (docs/architecture.md, 'Polling before sleeping')",
    ),
    avoid_irq_cpus: bool = typer.Option(
        True,
        "--avoid-irq-cpus/--any-cpu",
        help="single node: keep the event loop off the CPUs that take the data disk's "
        "interrupts (docs/architecture.md, 'Where the loop runs')",
    ),
    node_id: str | None = typer.Option(None, "--node-id", help="cluster: this node's name"),
    raft_port: int | None = typer.Option(
        None, "--raft-port", help="cluster: Raft port (turns clustering on)"
    ),
    peers: str | None = typer.Option(
        None, "--peers", help="cluster: the other members' Raft host:port, comma-separated"
    ),
    raft_bind: str | None = typer.Option(
        None, "--raft-bind", help="cluster: where the Raft port listens (default host:raft-port)"
    ),
    raft_secret_file: str | None = typer.Option(
        None, "--raft-secret-file", help="cluster: shared secret encrypting Raft traffic"
    ),
    raft_compaction_entries: int = typer.Option(
        5000,
        "--raft-compaction-entries",
        help="cluster: compact the Raft log into a snapshot after this many entries",
    ),
    http_port: int | None = HttpPortOpt,
    ssh_port: int | None = SshPortOpt,
    ssh_authorized_keys: str | None = SshKeysOpt,
    ssh_readonly_keys: str | None = SshReadonlyOpt,
    log_level: str = typer.Option("info", "--log-level"),
    log_format: str = LogFormatOpt,
) -> None:
    """Run the broker: TCP protocol, HTTP API, embedded durable store (+ Raft with --raft-port,
    + an SSH admin shell with --ssh-port)."""
    _setup_logging(log_level, log_format)
    _use_uvloop()
    from tq.broker.app import BrokerApp

    config = _broker_config(
        host,
        port,
        data_dir,
        lease,
        retention,
        retry_base,
        heartbeat_timeout,
        max_frame,
        retention_interval_s=retention_interval,
        hello_timeout_s=hello_timeout,
        max_connections=max_connections,
        compaction_min_entries=raft_compaction_entries,
        journal_mb=journal_mb,
        spin_us=spin_us,
        avoid_irq_cpus=avoid_irq_cpus,
        **_cluster_options(node_id, raft_port, peers, raft_bind, raft_secret_file),
    )
    if raft_port is not None:
        _check_cluster_members(data_dir, host, raft_port, config.peers)
    broker_app = BrokerApp(config, **_http_options(http_port))
    _add_ssh(broker_app, ssh_port, ssh_authorized_keys, ssh_readonly_keys)
    try:
        code = asyncio.run(broker_app.serve_forever())
    except OSError as exc:
        if exc.filename:  # the data dir or the journal, not the port (a full or read-only disk)
            fail(f"broker failed to start: {exc.filename}: {exc.strerror or exc}")
        fail(f"cannot start broker on {host}:{port}: {exc.strerror or exc}")
    except Exception as exc:
        fail(f"broker failed to start: {exc}")
    raise typer.Exit(code)


def _make_worker(
    broker: str | None,
    concurrency: int,
    queue: list[str] | None,
    app_modules: list[str] | None,
    heartbeat: float,
    grace: float,
    burst: bool,
) -> Any:
    from tq.errors import TqError
    from tq.worker.registry import import_app
    from tq.worker.runner import Worker

    url = broker_url_from_env(broker)
    try:
        parse_broker_url(url)
    except ValueError as exc:
        fail(str(exc), code=2)
    # Checked here, before anything is sent: the broker refuses such a worker's hello, which
    # read as an unreachable broker, retried forever (with --burst too).
    queues = queue or ["default"]
    for name in queues:
        _check_name("--queue", name)
    if len(queues) > 100:
        fail(f"a worker serves at most 100 queues, not {len(queues)}", code=2)
    sys.path.insert(0, os.getcwd())
    for module in app_modules or []:
        try:
            import_app(module)
        except Exception as exc:
            fail(f"cannot import --app {module}: {exc}")

    class CliWorker(Worker):
        async def run(self) -> None:
            """The broker refused the worker (a wrong token, ...): one line, exit 1."""
            try:
                await super().run()
            except TqError as exc:
                fail(f"{exc.code}: {exc.message}")

    return CliWorker(
        url,
        concurrency=concurrency,
        queues=queues,
        heartbeat_s=heartbeat,
        grace_s=grace,
        burst=burst,
    )


@app.command()
def worker(
    broker: str | None = BrokerOpt,
    concurrency: int = typer.Option(8, "--concurrency", "-c", min=1, max=10_000),
    queue: list[str] | None = typer.Option(None, "--queue", "-q", help="queue(s) to serve"),
    app_module: list[str] | None = typer.Option(None, "--app", help="module of @task handlers"),
    heartbeat: float = typer.Option(
        2.0,
        "--heartbeat",
        help="heartbeat interval (s); at most a third of the broker's heartbeat timeout and lease",
    ),
    grace: float = typer.Option(30.0, "--grace", help="SIGTERM: time to finish running tasks"),
    burst: bool = typer.Option(False, "--burst", help="exit once the queues are empty"),
    log_level: str = typer.Option("info", "--log-level"),
    log_format: str = LogFormatOpt,
) -> None:
    """Run a worker: claim tasks, run handlers, report results."""
    _setup_logging(log_level, log_format)
    _use_uvloop()
    w = _make_worker(broker, concurrency, queue, app_module, heartbeat, grace, burst)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.stop)
        run = asyncio.create_task(w.run())
        connected = asyncio.create_task(w.connected.wait())
        await asyncio.wait({run, connected}, return_when=asyncio.FIRST_COMPLETED)
        if connected.done():
            print(f"tq worker {w.worker_id} ready (concurrency {w.concurrency})", flush=True)
        else:
            connected.cancel()
        await run

    asyncio.run(main())


@app.command()
def up(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(7700),
    data_dir: str = typer.Option("./.tq-data"),
    concurrency: int = typer.Option(8, "--concurrency", "-c", min=1),
    app_module: list[str] | None = typer.Option(None, "--app", help="module of @task handlers"),
    http_port: int | None = HttpPortOpt,
    ssh_port: int | None = SshPortOpt,
    ssh_authorized_keys: str | None = SshKeysOpt,
    ssh_readonly_keys: str | None = SshReadonlyOpt,
    journal_mb: int | None = JournalOpt,
    log_level: str = typer.Option("info", "--log-level"),
    log_format: str = LogFormatOpt,
) -> None:
    """Broker and one worker in a single process: the quickest way to a working system."""
    _setup_logging(log_level, log_format)
    _use_uvloop()
    from tq.broker.app import BrokerApp
    from tq.errors import TqError

    # spin_us=0: the worker shares this event loop, and polling for the broker's sockets would
    # hold up the worker's own replies.
    config = _broker_config(
        host, port, data_dir, 30.0, 7 * 86400, 1.0, 10.0, 16 * 1024 * 1024, journal_mb, spin_us=0
    )
    broker_app = BrokerApp(config, **_http_options(http_port))
    _add_ssh(broker_app, ssh_port, ssh_authorized_keys, ssh_readonly_keys)

    async def main() -> int:
        bound = await broker_app.start()
        w = _make_worker(f"tcp://{host}:{bound}", concurrency, None, app_module, 2.0, 10.0, False)
        print(f"tq broker listening on {host}:{bound}", flush=True)
        if broker_app.http is not None:
            print(f"tq http listening on {host}:{broker_app.http_port}", flush=True)
        print(f"tq worker {w.worker_id} ready (concurrency {w.concurrency})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker_task = asyncio.create_task(w.run())
        stopper = asyncio.create_task(stop.wait())
        fatal = asyncio.create_task(broker_app.core.stopped.wait())
        await asyncio.wait({stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        fatal.cancel()
        w.stop()
        await worker_task
        if broker_app.core.fatal is not None:
            print(f"tq up: fatal store error: {broker_app.core.fatal}", file=sys.stderr)
            return 1
        await broker_app.stop()
        return 0

    try:
        raise typer.Exit(asyncio.run(main()))
    except OSError as exc:
        fail(f"cannot start on {host}:{port}: {exc.strerror or exc}")
    except TqError as exc:  # e.g. the SSH port is taken
        fail(exc.message)


# --- producer and admin commands -----------------------------------------------------------------


def _task_rows(tasks: list[Any]) -> list[list[Any]]:
    return [
        [
            t.id,
            t.name,
            t.queue,
            t.priority,
            t.state,
            t.attempt,
            when(t.submitted_at_ms),
            short(t.result if t.error is None else f"{t.error.type}: {t.error.message}"),
        ]
        for t in tasks
    ]


_TASK_COLUMNS = ["id", "name", "queue", "priority", "state", "attempt", "submitted", "result"]

# The broker's limits of a task (validate_spec in tq/broker/tcp.py; docs/architecture.md,
# "Limits"), checked here as well: a value out of range is a usage error (exit 2, one line)
# before anything is sent, not the broker's BAD_REQUEST (exit 1). Not imported from the broker,
# which would load it into every command; tests/cli/test_usage_errors.py keeps them equal.
MAX_RETRIES = 1000
MAX_TIMEOUT_S = 7 * 86400.0
MAX_BACKOFF_S = 86400.0


def _check_name(what: str, value: str) -> None:
    from tq.model import valid_name

    if not valid_name(value):
        fail(f"{what} {value!r} must be 1-200 of A-Za-z0-9_.:-", code=2)


def _show_task(info: Any, fmt: Format) -> None:
    if fmt is not Format.table:
        emit_data(info.to_dict(), fmt)
        return
    data = info.to_dict()
    error = data.pop("error")
    rows = [[k, when(v) if k.endswith("_at_ms") else short(v, 100)] for k, v in data.items()]
    if error:
        rows.append(["error", f"{error['type']}: {error['message']}"])
        if error.get("traceback"):
            rows.append(["traceback", error["traceback"]])
    emit_table(f"task {info.id}", ["field", "value"], rows)


def _valid_id(task_id: str) -> bool:
    from tq.model import valid_task_id

    return valid_task_id(task_id)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python's float says inf
        raise ValueError(f"{text} is out of range for a float")
    return value


@app.command()
def submit(
    name: str = typer.Argument(..., help="task name (a registered handler)"),
    payload: str = typer.Argument("null", help="payload as JSON"),
    priority: str = typer.Option("normal", "--priority", "-p", help="high, normal or low"),
    queue: str = typer.Option("default", "--queue", "-q"),
    max_retries: int = typer.Option(3, "--max-retries", help="retries after the first attempt"),
    timeout: float = typer.Option(300.0, "--timeout", help="handler timeout (s)"),
    backoff: float = typer.Option(
        0.0, "--backoff", help="first retry delay (s); 0: the broker's --retry-base"
    ),
    task_id: str | None = typer.Option(
        None, "--id", help="the task's id (default: a new one); submitting an id again is a no-op"
    ),
    wait: bool = typer.Option(False, "--wait", "-w", help="wait for the result and print it"),
    wait_timeout: float = typer.Option(60.0, "--wait-timeout"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Submit a task; prints its id (or, with --wait, its result)."""
    try:
        # Python's json takes NaN, Infinity and 1e400 (inf), which JSON cannot carry.
        value = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)
    except (json.JSONDecodeError, ValueError) as exc:
        fail(f"payload is not valid JSON: {exc}", code=2)
    if priority.lower() not in ("high", "normal", "low"):
        fail("--priority must be high, normal or low", code=2)
    _check_name("task name", name)
    _check_name("--queue", queue)
    _check_range("--max-retries", max_retries, 0, MAX_RETRIES)
    if not 0 < timeout <= MAX_TIMEOUT_S:  # NaN fails this too
        fail(f"--timeout must be above 0 and at most {MAX_TIMEOUT_S:g} s, not {timeout}", code=2)
    if not 0 <= backoff <= MAX_BACKOFF_S:  # NaN fails this too
        fail(f"--backoff must be from 0 to {MAX_BACKOFF_S:g} s, not {backoff}", code=2)
    if task_id is not None and not _valid_id(task_id):
        fail(f"--id {task_id[:80]!r} must be 1-64 of A-Za-z0-9_.:-", code=2)
    if wait:
        _check_range("--wait-timeout", wait_timeout, 0, MAX_WAIT_S)  # before submitting

    async def go(c: Any) -> Any:
        tid = await c.submit(
            name,
            value,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout_s=timeout,
            backoff_s=backoff,
            task_id=task_id,
        )
        if not wait:
            return tid
        return await c.wait(tid, timeout_s=wait_timeout)

    out = _run_client(go, broker)
    if not wait:
        if output is Format.table:
            say(out)
        else:
            emit_data({"id": out}, output)
        return
    if output is not Format.table:
        emit_data(out.to_dict(), output)
    elif out.state == "completed":
        say(json.dumps(out.result))
    else:
        err = out.error
        fail(f"task {out.id} is {out.state}" + (f": {err.type}: {err.message}" if err else ""))
    if out.state != "completed":
        raise typer.Exit(1)


@app.command()
def status(
    task_id: str,
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Show one task."""
    info = _run_client(lambda c: c.status(task_id), broker)
    _show_task(info, output)


@app.command("wait")
def wait_cmd(
    task_id: str,
    timeout: float = typer.Option(30.0, "--timeout"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Wait until a task finishes and show it (exit 1 if it did not complete)."""
    _check_range("--timeout", timeout, 0, MAX_WAIT_S)
    info = _run_client(lambda c: c.wait(task_id, timeout_s=timeout), broker)
    _show_task(info, output)
    if info.state != "completed":
        raise typer.Exit(1)


@app.command("list")
def list_cmd(
    state: str = typer.Option("pending", "--state", "-s"),
    queue: str | None = typer.Option(None, "--queue", "-q"),
    name: str | None = typer.Option(None, "--name", "-n"),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """List tasks in one state."""
    from tq.model import TaskState

    states = [s.value for s in TaskState]
    if state not in states:
        fail(f"--state must be one of {', '.join(states)}, not {state!r}", code=2)
    tasks = _run_client(lambda c: c.list(state, queue=queue, name=name, limit=limit), broker)
    if output is not Format.table:
        emit_data([t.to_dict() for t in tasks], output)
    else:
        emit_table(f"{state} tasks ({len(tasks)})", _TASK_COLUMNS, _task_rows(tasks))


@app.command()
def cancel(
    task_id: str,
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Cancel a pending (or retry-waiting) task."""
    info = _run_client(lambda c: c.cancel(task_id), broker)
    _show_task(info, output)


def _explain(info: Any, queue: dict[str, Any] | None, now_ms: int) -> dict[str, Any]:
    """Why a task is where it is (``queue``: its queue's stats, for a pending task)."""
    attempts = info.max_retries + 1
    out: dict[str, Any] = {
        "id": info.id,
        "state": info.state,
        "attempt": info.attempt,
        "max_attempts": attempts,
        "queue": info.queue,
        "priority": info.priority,
    }
    ran = f"attempt {info.attempt} of {attempts}"
    if info.state == "pending":
        paused = bool(queue and queue.get("paused"))
        pending = (queue or {}).get("pending", {})
        levels = ["high", "normal", "low"]
        ahead = sum(pending.get(p, 0) for p in levels[: levels.index(info.priority) + 1])
        out |= {"paused": paused, "ready_at_or_above_priority": ahead}
        why = f"waiting in queue {info.queue} at priority {info.priority}"
        if paused:
            why += f"; the queue is paused (`tq queue resume {info.queue}` lets workers take it)"
        else:
            why += f", one of {ahead} ready task(s) at this priority or higher"
        if info.attempt:
            why += f"; attempt {info.attempt + 1} of {attempts} comes next"
    elif info.state == "running":
        out |= {"worker_id": info.worker_id, "running_since_ms": info.started_at_ms}
        why = (
            f"{ran} is running on worker {info.worker_id} since {when(info.started_at_ms)} "
            f"({max(0, now_ms - info.started_at_ms) / 1000:.1f}s; timeout {info.timeout_s:g}s)"
        )
    elif info.state == "failed":
        out["retry_at_ms"] = info.eta_ms
        due_s = (info.eta_ms - now_ms) / 1000
        due = f"in {due_s:.1f}s" if due_s > 0 else "now"
        why = f"{ran} failed; the retry is due at {when(info.eta_ms)} ({due})"
    elif info.state == "dead":
        why = f"dead-lettered after {ran}; `tq retry {info.id}` sends it back to pending"
    elif info.state == "completed":
        why = f"completed at {when(info.finished_at_ms)} on worker {info.worker_id} ({ran})"
    else:
        why = f"cancelled at {when(info.finished_at_ms)}"
    if info.error is not None and info.state != "completed":
        out["last_error"] = {"type": info.error.type, "message": info.error.message}
    out["why"] = why
    return out


@app.command()
def explain(
    task_id: str,
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Why a task is where it is: state, attempts, queue (paused?), retry time, last error."""
    import time as _time

    async def go(c: Any) -> tuple[Any, dict[str, Any] | None]:
        info = await c.status(task_id)
        if info.state != "pending":
            return info, None
        queues: dict[str, Any] = (await c.stats())["queues"]
        return info, queues.get(info.queue)

    info, queue = _run_client(go, broker)
    data = _explain(info, queue, int(_time.time() * 1000))
    if output is not Format.table:
        emit_data(data, output)
        return
    rows: list[list[Any]] = [["why", data["why"]]]
    rows += [["attempt", f"{data['attempt']} of {data['max_attempts']}"]]
    for key in ("queue", "priority", "paused", "worker_id"):
        if key in data:
            rows.append([key, "yes" if data[key] is True else data[key] or "no"])
    for key in ("running_since_ms", "retry_at_ms"):
        if key in data:
            rows.append([key.removesuffix("_ms").replace("_", " "), when(data[key])])
    if "last_error" in data:
        error = data["last_error"]
        rows.append(["last error", f"{error['type']}: {error['message']}"])
    emit_table(f"task {info.id}: {info.state}", ["", ""], rows)


@app.command()
def retry(
    task_ids: list[str] = typer.Argument(..., help="ids of dead-lettered tasks"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be retried"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Send dead-lettered tasks back to pending with their attempts reset (as `tq dlq retry`
    with ids). Exit code 1 if one of them is not in the dead-letter queue."""
    filters = _dlq_filters(None, None, None, None)
    _dlq_change("retry", task_ids, filters, dry_run, broker, output)


@app.command()
def stats(broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Task counts by state, queue depths and workers."""
    data = _run_client(lambda c: c.stats(), broker)
    if output is not Format.table:
        emit_data(data, output)
        return
    emit_table("tasks by state", ["state", "count"], [[k, v] for k, v in data["states"].items()])
    emit_table(
        "queues",
        ["queue", "high", "normal", "low", "running", "oldest pending"],
        [
            [
                q,
                s["pending"]["high"],
                s["pending"]["normal"],
                s["pending"]["low"],
                s["running"],
                when(s["oldest_pending_ms"]),
            ]
            for q, s in data["queues"].items()
        ],
    )
    say(
        f"workers: {len(data['workers'])}  uptime: {data['uptime_s']:.0f}s  "
        f"version: {data['version']}"
    )


@app.command()
def workers(broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Connected workers: host, pid, concurrency, running, done, CPU, memory, last heartbeat."""
    data = _run_client(lambda c: c.stats(), broker)["workers"]
    if output is not Format.table:
        emit_data(data, output)
        return
    emit_table(
        f"workers ({len(data)})",
        ["id", "host", "pid", "concurrency", "running", "done", "cpu %", "rss MB", "heartbeat"],
        [
            [
                w["id"],
                w["host"],
                w["pid"],
                w["concurrency"],
                w["running"],
                w["done"],
                f"{w['cpu_percent']:.0f}",
                f"{w['rss_bytes'] / 1e6:.0f}",
                when(w["last_heartbeat_ms"]),
            ]
            for w in data
        ],
    )


@app.command()
def bench(
    broker: str | None = typer.Option(
        None, "--broker", "-b", help="bench an existing broker (skips memory and recovery)"
    ),
    json_out: str | None = typer.Option(None, "--json", help="write every figure to this file"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes: checks the harness works"),
    rate: int | None = typer.Option(None, "--rate", help="open-loop offered rate (default 2000/s)"),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="scenario(s): submit-batch, submit-pipelined, submit-latency, "
        "open-loop, end-to-end, dispatch-latency, memory, recovery, cluster, export",
    ),
    repeats: int | None = typer.Option(None, "--repeats", min=1, help="runs per scenario"),
    client_spin_us: int | None = typer.Option(
        None,
        "--client-spin-us",
        min=0,
        max=MAX_CLIENT_SPIN_US,
        help="the producers poll for each reply this long (spin_us; default: the client's, "
        f"{CLIENT_SPIN_US}; 0 never polls)",
    ),
) -> None:
    """Measure throughput, latency, memory and recovery (benchmarks/README.md)."""
    import tempfile
    from dataclasses import replace

    from tq.bench.machine import cpu_check_ms, describe, machine_info
    from tq.bench.runner import QUICK, Sizes, run_all, verdict

    # The brokers tq bench starts keep their data under the temp dir: that disk is measured.
    machine = machine_info(None if broker else tempfile.gettempdir())
    cpu_start = cpu_check_ms()
    sizes = QUICK if quick else Sizes()
    if repeats:
        sizes = replace(sizes, repeats=repeats)
    if client_spin_us is not None:
        sizes = replace(sizes, client_spin_us=client_spin_us)
    result = run_all(
        sizes,
        broker_url=broker,
        rate=rate,
        only=set(only) if only else None,
        progress=lambda msg: err_console.print(f"[dim]tq bench: {msg}[/]"),
    )
    summary = result.summary()
    machine["cpu_check_ms"] = {"start": cpu_start, "end": cpu_check_ms()}
    emit_table(
        f"tq bench ({'quick' if quick else 'full'}, {sizes.repeats} run(s) each"
        + f", producers poll {sizes.client_spin_us} µs for replies"
        + ")",
        ["scenario", "median", "min", "max", "unit", "target"],
        [
            [
                name,
                f"{s['median']:,.3f}",
                f"{s['min']:,.3f}",
                f"{s['max']:,.3f}",
                s["unit"],
                verdict(name, s["median"]),
            ]
            for name, s in summary.items()
        ],
    )
    for line in describe(machine):
        say(line)
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(
                {"scenarios": summary, "machine": machine, "client_spin_us": sizes.client_spin_us},
                fh,
                indent=2,
            )


cluster_app = typer.Typer(help="Raft cluster: status and membership.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


async def _node_status(url: str) -> dict[str, Any]:
    from tq.client import AsyncClient
    from tq.errors import BrokerUnavailable, TqError

    try:
        async with AsyncClient(url, connect_timeout_s=1.0, timeout_s=3.0) as client:
            stats = await client.stats()
    except TqError as exc:
        # As every other command words it: the code when the broker refused (a wrong token is
        # UNAUTHENTICATED), the message alone when there was nobody to refuse.
        error = exc.message if isinstance(exc, BrokerUnavailable) else f"{exc.code}: {exc.message}"
        return {"address": url, "reachable": False, "role": "down", "error": error}
    info = dict(stats.get("cluster") or {})
    info.pop("journal", None)
    return {"address": url, "reachable": True, **info}


@cluster_app.command("status")
def cluster_status(broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Every node given: role, leader, term, commit/apply index, lag. Exit 1 without a leader."""
    from tq.config import parse_broker_url

    try:
        urls = [f"tcp://{h}:{p}" for h, p in parse_broker_url(broker_url_from_env(broker))]
    except ValueError as exc:
        fail(str(exc), code=2)

    async def gather() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_node_status(u) for u in urls)))

    nodes = run_cancellable(gather())
    leaders = [n for n in nodes if n.get("role") == "leader"]
    leader_commit = max((n.get("commit_index") or 0 for n in leaders), default=None)
    for n in nodes:
        if leader_commit is not None and n.get("applied_index") is not None:
            n["lag"] = max(0, leader_commit - n["applied_index"])
    hinted = next((n.get("leader_client") for n in nodes if n.get("leader_client")), None)
    # A broker without --raft-port (role "single") always serves writes: it is its own leader,
    # and a healthy single node used to exit 1 as if the cluster had lost its leader.
    single = next((n["address"] for n in nodes if n.get("role") == "single"), None)
    leader = leaders[0]["address"] if leaders else hinted or single
    data = {"leader": leader, "nodes": nodes}
    if output is not Format.table:
        emit_data(data, output)
    else:
        emit_table(
            f"cluster (leader: {leader or 'none'})",
            ["address", "node", "role", "term", "commit", "applied", "lag", "raft address"],
            [
                [
                    n["address"],
                    n.get("node_id", ""),
                    n.get("role"),
                    n.get("term"),
                    n.get("commit_index"),
                    n.get("applied_index"),
                    n.get("lag"),
                    n.get("raft_address", ""),
                ]
                for n in nodes
            ],
        )
    if leader is None:
        # The output above has the details; stderr says why in one line (it used to be silent).
        fail("no leader: " + "; ".join(_node_problem(n) for n in nodes))


def _node_problem(node: dict[str, Any]) -> str:
    """Why this node does not name a leader, for ``tq cluster status``'s error line."""
    if not node.get("reachable"):
        return f"{node['address']}: {node.get('error', 'unreachable')}"
    quorum = "" if node.get("has_quorum") is not False else ", without quorum"
    return f"{node['address']}: {node.get('role')}{quorum}, no leader known"


def _membership(op: str, address: str, broker: str | None, output: Format) -> None:
    from tq.protocol.messages import Ack, ClusterChange

    _check_host_port(repr(address), address)  # before asking the broker: a usage error

    async def go(c: Any) -> None:
        await c.call(lambda rid: ClusterChange(rid, op, address), Ack, retry=False, timeout_s=30)

    _run_client(go, broker)
    verb = "added" if op == "add" else "removed"
    _said({verb: address}, f"{verb} {address}", output)


@cluster_app.command("add")
def cluster_add(
    address: str = typer.Argument(..., help="the new node's Raft host:port"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Add a member (start it with --peers listing the current members)."""
    _membership("add", address, broker, output)


@cluster_app.command("remove")
def cluster_remove(
    address: str = typer.Argument(..., help="the member's Raft host:port"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Remove a member."""
    _membership("remove", address, broker, output)


queue_app = typer.Typer(help="Pause and resume queues.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
dlq_app = typer.Typer(help="The dead-letter queue: list, show, retry, purge.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _bar(n: int, top: int, width: int = 6) -> str:
    return "█" * (round(width * n / top) if top else 0)


@app.command()
def queues(broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Queues: depth (with a bar) and by priority, running, retrying, in/out rates over the last
    minute, oldest pending age, paused."""
    import time as _time

    data = _run_client(lambda c: c.stats(), broker)["queues"]
    if output is not Format.table:
        emit_data(data, output)
        return
    now_ms = _time.time() * 1000
    top = max((sum(q["pending"].values()) for q in data.values()), default=0)
    emit_table(
        f"queues ({len(data)})",
        [
            "queue",
            "depth",
            "",
            "high",
            "normal",
            "low",
            "running",
            "retrying",
            "in/s",
            "out/s",
            "oldest",
            "paused",
        ],
        [
            [
                name,
                sum(q["pending"].values()),
                _bar(sum(q["pending"].values()), top),
                q["pending"]["high"],
                q["pending"]["normal"],
                q["pending"]["low"],
                q["running"],
                q["delayed"],
                f"{q['rate_in']:.1f}",
                f"{q['rate_out']:.1f}",
                f"{(now_ms - q['oldest_pending_ms']) / 1000:.1f}s"
                if q["oldest_pending_ms"]
                else "",
                "yes" if q["paused"] else "",
            ]
            for name, q in data.items()
        ],
    )


def _said(data: dict[str, Any], text: str, output: Format) -> None:
    if output is Format.table:
        say(text)
    else:
        emit_data(data, output)


@queue_app.command("pause")
def queue_pause(queue: str, broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Stop handing out this queue's tasks (submits are still accepted)."""
    _check_name("queue", queue)
    _run_client(lambda c: c.pause_queue(queue), broker)
    _said({"queue": queue, "paused": True}, f"paused {queue}", output)


@queue_app.command("resume")
def queue_resume(queue: str, broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """Hand out this queue's tasks again."""
    _check_name("queue", queue)
    _run_client(lambda c: c.resume_queue(queue), broker)
    _said({"queue": queue, "paused": False}, f"resumed {queue}", output)


QueueFilter = typer.Option(None, "--queue", "-q")
NameFilter = typer.Option(None, "--name", "-n", help="task name")
ErrorFilter = typer.Option(None, "--error-type", help="e.g. TIMEOUT, RuntimeError")
AgeFilter = typer.Option(None, "--older-than", help="finished more than this many seconds ago")


def _dlq_filters(
    queue: str | None, name: str | None, error_type: str | None, older_than: float | None
) -> dict[str, Any]:
    if older_than is not None and not older_than >= 0:  # NaN fails this too
        fail(f"--older-than must be a number of seconds >= 0, not {older_than}", code=2)
    return {"queue": queue, "name": name, "error_type": error_type, "older_than_s": older_than}


@dlq_app.command("list")
def dlq_list(
    queue: str | None = QueueFilter,
    name: str | None = NameFilter,
    error_type: str | None = ErrorFilter,
    older_than: float | None = AgeFilter,
    limit: int = typer.Option(100, "--limit", min=1, max=10_000),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Dead-lettered tasks matching the filters."""
    filters = _dlq_filters(queue, name, error_type, older_than)
    tasks = _run_client(lambda c: c.dead_letters(limit=limit, **filters), broker)
    if output is not Format.table:
        emit_data([t.to_dict() for t in tasks], output)
    else:
        emit_table(f"dead letters ({len(tasks)})", _TASK_COLUMNS, _task_rows(tasks))


@dlq_app.command("show")
def dlq_show(task_id: str, broker: str | None = BrokerOpt, output: Format = OutputOpt) -> None:
    """One dead-lettered task with its error and traceback."""
    info = _run_client(lambda c: c.status(task_id), broker)
    if info.state != "dead":
        fail(f"task {task_id} is {info.state}, not in the dead-letter queue")
    _show_task(info, output)


DLQ_PAGE = 10_000  # dead letters per request (the broker's MAX_LIST)


def _dlq_change(
    op: str,
    task_ids: list[str] | None,
    filters: dict[str, Any],
    dry_run: bool,
    broker: str | None,
    output: Format,
) -> None:
    """Retry or purge dead letters; with ids, exit 1 unless each was one (and matched)."""
    if not task_ids and not any(v is not None for v in filters.values()) and not dry_run:
        fail(f"name task ids, or give a filter (--queue, --name, ...) to {op} many", code=2)

    async def go(c: Any) -> list[str]:
        """Every dead letter named or matching, in requests of at most ``DLQ_PAGE`` (a broker
        answers at most that many at once; one request stopped at 1,000 and said nothing)."""
        fn = c.retry_dead if op == "retry" else c.purge_dead
        done: list[str] = []
        if task_ids:
            for i in range(0, len(task_ids), DLQ_PAGE):
                page = task_ids[i : i + DLQ_PAGE]
                done += await fn(page, dry_run=dry_run, limit=DLQ_PAGE, **filters)
            return done
        seen: set[str] = set()
        while True:
            ids: list[str] = await fn(None, dry_run=dry_run, limit=DLQ_PAGE, **filters)
            fresh = [tid for tid in ids if tid not in seen]  # (a retried task may die again)
            seen.update(fresh)
            done += fresh
            if dry_run or len(ids) < DLQ_PAGE or not fresh:
                if dry_run and len(ids) == DLQ_PAGE:
                    stderr().print(f"tq: only the first {DLQ_PAGE:,} are shown", highlight=False)
                return done

    ids = _run_client(go, broker)
    verb = {"retry": "retried", "purge": "purged"}[op]
    if output is not Format.table:
        emit_data({"dry_run": dry_run, verb: ids}, output)
    else:
        say(f"{'would be ' if dry_run else ''}{verb}: {len(ids)}")
        for tid in ids:
            say(f"  {tid}")
    # Every form that names ids says which were not acted on, with exit 1: `tq dlq retry ID` and
    # `tq dlq purge ID` exited 0 ("retried: 0") while their alias `tq retry ID` exited 1.
    found = set(ids)
    missing = list(dict.fromkeys(tid for tid in task_ids or [] if tid not in found))
    if missing:
        where = "the dead-letter queue"
        if any(v is not None for v in filters.values()):
            where += " or not matching the filters"
        fail(f"not in {where}: {', '.join(missing)}")


@dlq_app.command("retry")
def dlq_retry(
    task_ids: list[str] | None = typer.Argument(None, help="task ids (or use filters)"),
    queue: str | None = QueueFilter,
    name: str | None = NameFilter,
    error_type: str | None = ErrorFilter,
    older_than: float | None = AgeFilter,
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be retried"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Send dead-lettered tasks back to pending with their attempts reset."""
    filters = _dlq_filters(queue, name, error_type, older_than)
    _dlq_change("retry", task_ids, filters, dry_run, broker, output)


@dlq_app.command("purge")
def dlq_purge(
    task_ids: list[str] | None = typer.Argument(None, help="task ids (or use filters)"),
    queue: str | None = QueueFilter,
    name: str | None = NameFilter,
    error_type: str | None = ErrorFilter,
    older_than: float | None = AgeFilter,
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be purged"),
    broker: str | None = BrokerOpt,
    output: Format = OutputOpt,
) -> None:
    """Delete dead-lettered tasks for good."""
    filters = _dlq_filters(queue, name, error_type, older_than)
    _dlq_change("purge", task_ids, filters, dry_run, broker, output)


# Commands that live in their own modules (imported here, last: they may use the helpers above).
from tq.cli import history as _history  # noqa: E402
from tq.cli import top as _top  # noqa: E402

_top.register(app)
_history.register(app)


def main() -> None:
    """``tq``. Usage errors are one line (exit 2), as every other tq error is, where typer
    draws a boxed panel under the usage text; the SSH shell does the same (``shell.py``)."""
    try:
        rv = app(standalone_mode=False)  # returns the code of a typer.Exit (every fail())
    except typer.TyperException as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # `tq` alone: the help is the answer
            error_line(" ".join(exc.format_message().split()))
        sys.exit(exc.exit_code)
    except typer.Abort:
        error_line("aborted")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


if __name__ == "__main__":
    main()
