"""The HTTP face of the broker: REST under ``/api/v1``, ``/metrics``, ``/healthz``, ``/readyz``
and ``/openapi.json``; the only importer of aiohttp.

It runs on the broker's own event loop (an aiohttp ``AppRunner`` and ``TCPSite``) and drives the
same ``BrokerCore`` as the TCP protocol: a change is a command handed to ``BrokerCore.submit``
(answered once durable), a read runs after ``BrokerCore.after_durable``, leader-only operations
answer ``NOT_LEADER`` on a follower, and task specs pass the TCP protocol's ``validate_spec``.
Routes, bodies and query parameters come from ``tq/broker/openapi.py``, which also builds the
OpenAPI document from them.

Every error is ``application/problem+json`` (RFC 9457) carrying tq's stable error ``code``.

The API serves no web page, so no browser has a reason to call it: ``_guard_middleware`` refuses
requests that a page on another site could make the operator's browser send (an ``Origin`` or a
cross-site ``Sec-Fetch-Site``, 403; a body that is not JSON, 415, as form and text bodies need no
CORS preflight) and, on a loopback-bound broker, a ``Host`` that is not loopback (421: DNS
rebinding). Bodies are read within a deadline (408), so a half-sent one cannot hold a connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
from aiohttp import web

from tq.broker import commands as cmds
from tq.broker.commands import Cancel, Command, PurgeDead, RetryDead, Submit
from tq.broker.core import BrokerCore
from tq.broker.metrics import CONTENT_TYPE, BrokerMetrics
from tq.broker.openapi import (
    API_PREFIX,
    DEAD_LETTER_PARAMS,
    LIST_PARAMS,
    PROBLEM_JSON,
    ROUTES,
    STATES,
    ClusterOut,
    DeadLetterChange,
    DeadLetterChanged,
    Health,
    Param,
    PriorityDepth,
    Problem,
    QueueList,
    QueueOut,
    QueuePaused,
    Ready,
    Route,
    Submitted,
    SubmittedBatch,
    TaskBatchIn,
    TaskError,
    TaskIn,
    TaskList,
    TaskOut,
    TaskPage,
    WorkerList,
    build_document,
)
from tq.broker.tcp import listening_socket, validate_spec
from tq.errors import (
    BadRequest,
    BrokerUnavailable,
    InternalError,
    NotLeader,
    PayloadTooLarge,
    ShuttingDown,
    TaskNotFound,
    TqError,
    Unauthenticated,
    UnknownMessage,
)
from tq.logfields import kv
from tq.model import Priority, Task, TaskState, new_ids, valid_name, valid_task_id
from tq.protocol.messages import TaskSpec

if TYPE_CHECKING:
    from tq.broker.tcp import TcpServer

log = logging.getLogger("tq.broker.http")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SHUTDOWN_GRACE_S: Final = 2.0
# A request body must arrive at this rate at least, after ``--hello-timeout`` of grace (see
# ``HttpServer._body``). 256 KiB/s is a 2 Mbit/s uplink: a full 16 MiB body gets 10 + 64 s, so
# any client that can reasonably send a batch is not cut off, while a body that trickles in a
# byte now and then (or never ends) frees its connection and its buffer within that bound.
# 1 MiB/s would have refused a 16 MiB batch from anything slower than about 9 Mbit/s.
MIN_BODY_RATE: Final = 256 * 1024  # bytes/s
LIST_SCAN_BUDGET: Final = 20_000  # tasks looked at per page when time filters skip many

STATUS_BY_CODE: Final = {
    "BAD_REQUEST": 400,
    "BAD_FRAME": 400,
    "UNSUPPORTED_VERSION": 400,
    "UNKNOWN_MESSAGE": 404,
    "UNAUTHENTICATED": 401,
    "TASK_NOT_FOUND": 404,
    "INVALID_STATE": 409,
    "LEASE_LOST": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "FRAME_TOO_LARGE": 413,
    "NOT_LEADER": 503,
    "OUTCOME_UNKNOWN": 503,
    "SHUTTING_DOWN": 503,
    "UNAVAILABLE": 503,
    "WAIT_TIMEOUT": 504,
    "INTERNAL": 500,
}
TITLE_BY_CODE: Final = {
    "BAD_REQUEST": "Bad request",
    "UNKNOWN_MESSAGE": "No such endpoint",
    "UNAUTHENTICATED": "Unauthenticated",
    "TASK_NOT_FOUND": "Task not found",
    "INVALID_STATE": "Invalid state",
    "PAYLOAD_TOO_LARGE": "Payload too large",
    "NOT_LEADER": "Not the leader",
    "OUTCOME_UNKNOWN": "Leadership lost, outcome unknown",
    "SHUTTING_DOWN": "Shutting down",
    "UNAVAILABLE": "Unavailable",
    "INTERNAL": "Internal error",
}
# validate_spec's messages start with what they are about: the field, for the problem body.
_SPEC_FIELDS: Final = (
    ("task id", "id"),
    ("task name", "name"),
    ("queue", "queue"),
    ("priority", "priority"),
    ("payload", "payload"),
    ("max_retries", "max_retries"),
    ("timeout_s", "timeout_s"),
    ("backoff_s", "backoff_s"),
)
_AT_PATH: Final = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED_FIELD: Final = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]+)`")

_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class FieldError(Exception):
    """A ``TqError`` about one input: a JSON path in the body, a parameter's or a header's name.
    ``status`` overrides the code's usual one (403, 408, 415, 421 are ``BAD_REQUEST`` too: the
    TCP protocol has no code of its own for them); ``close``: answer, then close the connection
    (a body that did not arrive in time is not worth waiting for any longer)."""

    def __init__(
        self, error: TqError, field: str | None, *, status: int = 0, close: bool = False
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.field = field
        self.status = status
        self.close = close


# --- problems ------------------------------------------------------------------------------------


def problem_for(
    exc: TqError, *, field: str | None = None, instance: str | None = None, status: int = 0
) -> tuple[Problem, dict[str, str]]:
    """The RFC 9457 body and extra headers for a tq error (``status`` overrides the mapping)."""
    code = exc.code
    status = status or STATUS_BY_CODE.get(code, 500)
    headers: dict[str, str] = {}
    leader = exc.leader if isinstance(exc, NotLeader) else None
    if status == 503:
        headers["Retry-After"] = "1"
    if leader:
        headers["Tq-Leader"] = leader
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tq"'
    problem = Problem(
        type=f"urn:tq:error:{code}",
        title=TITLE_BY_CODE.get(code, code.replace("_", " ").capitalize()),
        status=status,
        detail=exc.message,
        code=code,
        instance=instance,
        field=field,
        leader=leader,
    )
    return problem, headers


def problem_response(
    exc: TqError, *, field: str | None = None, instance: str | None = None, status: int = 0
) -> web.Response:
    problem, headers = problem_for(exc, field=field, instance=instance, status=status)
    return web.Response(
        body=_encoder.encode(problem),
        status=problem.status,
        headers={"Content-Type": PROBLEM_JSON, **headers},
    )


async def _answer_then_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection at once. Left to aiohttp, a request whose body
    was not read whole keeps its connection open up to 10 s more ("lingering", reading and
    discarding the rest): more time for the very client that was too slow."""
    response.force_close()  # Connection: close
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the transport sends what is buffered, then closes
    return response


def _http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body over the limit) as problems."""
    what = f"{request.method} {request.path}"
    error: TqError
    if exc.status == 404:
        error = UnknownMessage(f"no endpoint {what}")
    elif exc.status == 405:
        error = UnknownMessage(f"{request.method} is not allowed on {request.path}")
    elif exc.status == 413:
        error = PayloadTooLarge("the request body is larger than the broker's --max-frame")
    elif exc.status >= 500:
        error = InternalError(exc.reason)
    else:
        error = BadRequest(exc.reason)
    response = problem_response(error, instance=request.path, status=exc.status)
    if exc.status == 405:
        response.headers["Allow"] = _allowed_methods(request.path)
    return response


_ROUTE_PATTERNS: Final = [
    (re.compile(re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(r.path))), r) for r in ROUTES
]


def _allowed_methods(path: str) -> str:
    """What the document lists for ``path``: a static route wins over a template that also
    matches it (``/api/v1/tasks/batch`` is not ``/api/v1/tasks/{task_id}``)."""
    matches = [r for pattern, r in _ROUTE_PATTERNS if pattern.fullmatch(path)]
    static = [r for r in matches if "{" not in r.path]
    return ",".join(sorted({r.method for r in static or matches}))


# --- who may call -------------------------------------------------------------------------------

# The probes and the document answer a browser too: they change nothing, reveal nothing a token
# guards (they are the routes open without one), and a link to them from a wiki or a dashboard
# should open. Everything else refuses requests a browser sends on behalf of a page.
_BROWSER_OK_PATHS: Final = frozenset(r.path for r in ROUTES if not r.authenticated)
# "none": the user typed the URL or opened a bookmark; "same-origin": a page of this broker's
# own origin (it has none, and a page that got there by DNS rebinding fails the Host check).
_USER_FETCH_SITES: Final = ("same-origin", "none")
_HOST_HEADER: Final = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]*)(?::[0-9]{1,5})?")


def loopback_host(value: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name: ``localhost``,
    ``127.x.y.z`` or ``[::1]``, with or without a port (any port: a tunnel or a proxy may
    forward another one). A DNS-rebinding page's requests carry the attacker's host name."""
    m = _HOST_HEADER.fullmatch(value.strip())
    if m is None:
        return False
    name = m["name"].lower()
    if name == "localhost":
        return True
    try:
        if name.startswith("["):
            return ipaddress.IPv6Address(name[1:-1]).is_loopback
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def json_media_type(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type such as ``application/merge-patch+json``:
    what the API decodes. Every type a page may send cross-site without a CORS preflight
    (``text/plain``, forms) is neither."""
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def refuse_foreign(request: web.Request, *, loopback: bool) -> None:
    """Raise the problem for a request no intended client sends; the CLI, Python's clients,
    curl, Prometheus and probes send no ``Origin`` and a JSON body when they send one.

    Without a token (the default), any web page open in the operator's browser could otherwise
    drive a broker on 127.0.0.1: a "simple" cross-site POST (``text/plain`` or form body, or no
    body: pause, resume, cancel) needs no CORS preflight, and the page need not read the answer
    to submit tasks or purge the dead-letter queue."""
    host = request.headers.get("Host")
    if loopback and host and not loopback_host(host):
        # DNS rebinding: evil.example first resolves to the attacker, then to 127.0.0.1; the
        # page is then "same-origin" with the broker, but its Host still says evil.example.
        raise FieldError(
            BadRequest(
                f"this broker listens on loopback and answers only Host: localhost, 127.x.y.z "
                f"or [::1], not {host[:100]!r}"
            ),
            "Host",
            status=421,
        )
    if request.path not in _BROWSER_OK_PATHS:
        origin = request.headers.get("Origin")
        if origin is not None:
            raise FieldError(
                BadRequest(
                    f"requests from web pages are refused (Origin: {origin[:100]}): the API "
                    "serves no page of its own"
                ),
                "Origin",
                status=403,
            )
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in _USER_FETCH_SITES:
            raise FieldError(
                BadRequest(f"requests from web pages are refused (Sec-Fetch-Site: {site[:50]})"),
                "Sec-Fetch-Site",
                status=403,
            )
    if request.body_exists and not json_media_type(request.content_type):
        raise FieldError(
            BadRequest(
                f"a request body must be application/json, not {request.content_type[:100]}"
            ),
            "Content-Type",
            status=415,
        )


# --- conversions ---------------------------------------------------------------------------------


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encoder.encode(value),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _stored_value(raw: bytes | None) -> tuple[Any, str]:
    """Stored bytes as (JSON value, "json"), or (base64 text, "base64") when not JSON."""
    if raw is None:
        return None, "json"
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return base64.b64encode(raw).decode(), "base64"
    return msgspec.Raw(raw), "json"


def task_out(task: Task, with_payload: bool = True) -> TaskOut:
    payload, payload_encoding = _stored_value(task.payload) if with_payload else (None, "json")
    result, result_encoding = _stored_value(task.result)
    err = task.error
    return TaskOut(
        id=task.id,
        name=task.name,
        queue=task.queue,
        priority=Priority(task.priority).label,  # type: ignore[arg-type]
        state=task.state,  # type: ignore[arg-type]
        attempt=task.attempt,
        max_retries=task.max_retries,
        timeout_s=task.timeout_s,
        backoff_s=task.backoff_s,
        submitted_at_ms=task.submitted_at_ms,
        started_at_ms=task.started_at_ms,
        finished_at_ms=task.finished_at_ms,
        eta_ms=task.eta_ms,
        worker_id=task.worker_id,
        payload=payload,
        payload_encoding=payload_encoding,  # type: ignore[arg-type]
        result=result,
        result_encoding=result_encoding,  # type: ignore[arg-type]
        error=None if err is None else TaskError(err.type, err.message, err.traceback),
    )


def _field_of(message: str) -> tuple[str, str | None]:
    """msgspec's "... - at `$.tasks[0].priority`" as (the message, "tasks[0].priority")."""
    path = ""
    at = _AT_PATH.search(message)
    if at is not None:
        path = at["path"]
        message = message[: at.start()]
    named = _NAMED_FIELD.search(message)
    if named is not None:
        path = f"{path}.{named['name']}"
    return message, path.lstrip(".") or None


def _decode(raw: bytes, type_: type[T]) -> T:
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        value: T = decoder.decode(raw if raw.strip() else b"{}")
    except msgspec.ValidationError as exc:
        message, field = _field_of(str(exc))
        raise FieldError(BadRequest(f"{field}: {message}" if field else message), field) from None
    except msgspec.DecodeError as exc:
        raise FieldError(BadRequest(f"the body is not valid JSON: {exc}"), None) from None
    except RecursionError:  # msgspec's answer to JSON nested thousands deep
        raise FieldError(BadRequest("the body is nested too deeply"), None) from None
    return value


def _spec(body: TaskIn, task_id: str, prefix: str = "") -> TaskSpec:
    priority = body.priority if isinstance(body.priority, str) else int(body.priority)
    spec = TaskSpec(
        id=task_id,
        name=body.name,
        payload=bytes(body.payload),
        queue=body.queue,
        priority=int(Priority.parse(priority)),
        max_retries=int(body.max_retries),
        timeout_s=body.timeout_s,
        backoff_s=body.backoff_s,
    )
    try:
        validate_spec(spec)  # the TCP protocol's checks: one definition of a valid task
    except TqError as exc:
        field = next((f for text, f in _SPEC_FIELDS if exc.message.startswith(text)), None)
        where = f"{prefix}{field}" if field else (prefix.rstrip(".") or None)
        raise FieldError(exc, where) from None
    return spec


def _param(p: Param, raw: str) -> Any:
    """A query parameter parsed and checked exactly as its schema in the document says."""
    value: Any
    try:
        if p.kind == "integer":
            number = float(raw)  # "3" and "3.0" alike, as JSON Schema's integer
            if not number.is_integer():
                raise ValueError(raw)
            value = int(raw) if raw.lstrip("+-").isdigit() else int(number)
        elif p.kind == "number":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
        else:
            value = raw
    except ValueError:
        raise FieldError(
            BadRequest(f"{p.name} must be {'an integer' if p.kind == 'integer' else 'a number'}"),
            p.name,
        ) from None
    if p.minimum is not None and value < p.minimum:
        raise FieldError(BadRequest(f"{p.name} must be >= {p.minimum:g}"), p.name)
    if p.maximum is not None and value > p.maximum:
        raise FieldError(BadRequest(f"{p.name} must be <= {p.maximum:g}"), p.name)
    if p.max_length is not None and len(value) > p.max_length:
        raise FieldError(BadRequest(f"{p.name} is longer than {p.max_length}"), p.name)
    if p.enum is not None and value not in p.enum:
        raise FieldError(BadRequest(f"{p.name} must be one of {', '.join(p.enum)}"), p.name)
    if p.pattern is not None and not re.search(p.pattern, value):
        raise FieldError(BadRequest(f"{p.name} must match {p.pattern}"), p.name)
    return value


def _query(request: web.Request, params: tuple[Param, ...]) -> dict[str, Any]:
    return {
        p.name: None if (raw := request.query.get(p.name)) is None else _param(p, raw)
        for p in params
        if p.where == "query"
    }


MAX_REQUEST_LINE = 64 * 1024


def encode_cursor(state: str, after: str | None) -> str:
    return base64.urlsafe_b64encode(_encoder.encode([state, after])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str | None]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        state, after = msgspec.json.decode(raw, type=tuple[str, str | None])
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise FieldError(BadRequest("cursor is not one this broker returned"), "cursor") from None
    if state not in STATES:
        raise FieldError(BadRequest("cursor is not one this broker returned"), "cursor")
    return state, after


# --- the server ----------------------------------------------------------------------------------


class HttpServer:
    """The HTTP site on the broker's loop. ``start()`` binds; ``stop_accepting()`` then
    ``close()`` shut it down around the core's drain."""

    def __init__(self, core: BrokerCore, tcp: TcpServer) -> None:
        self.core = core
        self.tcp = tcp
        self.metrics = BrokerMetrics(core, self._connection_counts)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._loopback = False  # bound to a loopback address: Host headers are checked
        self._document = b""
        self._handlers: dict[str, Handler] = {
            "submitTask": self.submit_task,
            "submitBatch": self.submit_batch,
            "listTasks": self.list_tasks,
            "getTask": self.get_task,
            "cancelTask": self.cancel_task,
            "listQueues": self.list_queues,
            "pauseQueue": self.pause_queue,
            "resumeQueue": self.resume_queue,
            "listWorkers": self.list_workers,
            "getStats": self.get_stats,
            "listDeadLetters": self.list_dead_letters,
            "retryDeadLetters": self.retry_dead_letters,
            "purgeDeadLetters": self.purge_dead_letters,
            "getCluster": self.get_cluster,
            "healthz": self.healthz,
            "readyz": self.readyz,
            "metrics": self.get_metrics,
            "openapi": self.get_openapi,
        }

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, strict: bool = True) -> int:
        """Bind ``host:port`` (0: a free port). Unless ``strict``, a taken port falls back to a
        free one with a warning (the default port must not stop a second broker on one host)."""
        token = self.core.config.auth_token
        self._document = _encoder.encode(build_document(auth=token is not None))
        app = web.Application(
            client_max_size=self.core.config.max_frame_bytes,
            # problems outermost: the guard's refusals become problem+json like any error
            middlewares=[self._problem_middleware(), self._guard_middleware()],
        )
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._bind(route, token))
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            # Every query parameter within its documented maxLength, percent-encoded, must
            # reach our handlers (which answer problem+json), not aiohttp's parser (8 KiB
            # default, answering text/plain).
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_REQUEST_LINE,
            # A connection that has not sent a whole request head this long after it opened, or
            # after its last response, is closed: aiohttp's default (about an hour) let
            # half-sent requests hold file descriptors (the TCP protocol's hello timeout).
            keepalive_timeout=self.core.config.hello_timeout_s,
        )
        await runner.setup()
        self._runner = runner
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            if strict or port == 0:
                raise OSError(exc.errno, f"HTTP port {port}: {exc.strerror or exc}") from exc
            log.warning("http.port_taken", extra=kv(port=port, error=exc.strerror))
            sock = listening_socket(host, 0)
        await web.SockSite(runner, sock).start()
        self.port = int(sock.getsockname()[1])
        # What was bound decides, not what was asked: "localhost" binds 127.0.0.1.
        self._loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        self.metrics.start()
        log.info("http.started", extra=kv(host=host, port=self.port))
        return self.port

    async def stop_accepting(self) -> None:
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()

    async def close(self) -> None:
        """Answer what is in flight (up to ``SHUTDOWN_GRACE_S``), then close every connection."""
        self.metrics.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _bind(self, route: Route, token: str | None) -> Handler:
        handler = self._handlers[route.operation_id]
        if token is None or not route.authenticated:
            return handler
        expected = token.encode()

        async def authenticated(request: web.Request) -> web.StreamResponse:
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                raise Unauthenticated("this broker needs an Authorization: Bearer token")
            return await handler(request)

        return authenticated

    def _guard_middleware(self) -> Any:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refuse_foreign(request, loopback=self._loopback)
            return await handler(request)

        return guard

    def _problem_middleware(self) -> Any:
        @web.middleware
        async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except FieldError as exc:
                response = problem_response(
                    exc.error, field=exc.field, instance=request.path, status=exc.status
                )
                if exc.status == 415:
                    response.headers["Accept-Post"] = "application/json"  # RFC 9110 15.5.16
                if exc.close:
                    return await _answer_then_close(request, response)
                return response
            except TqError as exc:
                return problem_response(exc, instance=request.path)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return _http_error(exc, request)
            except ConnectionResetError:
                # The client went away mid-request (an aborted upload): not the broker's fault,
                # and logging a traceback per occurrence would let anyone fill the log.
                log.info("http.client_gone", extra=kv(path=request.path))
                return web.Response(status=400)  # nobody reads it; aiohttp drops it quietly
            except Exception as exc:  # a handler bug costs one request, never the broker
                log.exception("http.handler_failed", extra=kv(path=request.path))
                return problem_response(
                    InternalError(f"internal error: {type(exc).__name__}"), instance=request.path
                )

        return problems

    def _connection_counts(self) -> tuple[int, int]:
        workers = clients = 0
        for conn in self.tcp.connections:
            if conn.worker_id is not None:
                workers += 1
            elif conn.hello is not None:
                clients += 1
        return workers, clients

    # --- bridges to the core ---------------------------------------------------------------------

    async def _command(self, cmd: Command) -> Any:
        """Hand one command to the core; its result once durable (a TqError is raised)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def reply(value: Any) -> None:
            if not fut.done():
                fut.set_result(value)

        self.core.submit(cmd, reply)
        value = await fut
        if isinstance(value, TqError):
            raise value
        return value

    async def _durable(self) -> None:
        """Reads wait until everything applied so far is durable, as the TCP protocol's do."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.core.after_durable(ready)
        await fut

    async def _body(self, request: web.Request) -> bytes:
        """The request body, read within ``--hello-timeout`` plus its length at
        ``MIN_BODY_RATE``; a 408 (then the connection is closed) otherwise. The keep-alive
        timeout bounds only the wait for a request head: a body that stopped half-way held its
        connection, its handler and its buffer for ever. Without a Content-Length (chunked) the
        length is the largest body accepted (``--max-frame``), and a larger Content-Length
        counts as that much too: more than that is a 413 anyway, and a declared 1 TB must not
        buy a deadline of days."""
        max_bytes = self.core.config.max_frame_bytes
        length = min(request.content_length or max_bytes, max_bytes)
        deadline_s = self.core.config.hello_timeout_s + length / MIN_BODY_RATE
        try:
            return await asyncio.wait_for(request.read(), deadline_s)
        except TimeoutError:
            log.info("http.slow_body_closed", extra=kv(path=request.path, after_s=deadline_s))
            raise FieldError(
                BadRequest(f"the request body did not arrive within {deadline_s:.1f} s"),
                None,
                status=408,
                close=True,
            ) from None

    def _require_serving(self) -> None:
        if not self.core.serving:
            raise self.core.refusal()

    # --- tasks -----------------------------------------------------------------------------------

    async def submit_task(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await self._body(request), TaskIn)
        spec = _spec(body, body.id or new_ids.new())
        ids, _rejected = await self._command(Submit([spec]))
        task_id = ids[0]
        location = f"{API_PREFIX}/tasks/{task_id}"
        return _json(Submitted(task_id), 201, {"Location": location})

    async def submit_batch(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await self._body(request), TaskBatchIn)
        fresh = iter(new_ids.many(sum(1 for t in body.tasks if t.id is None)))
        specs = [_spec(t, t.id or next(fresh), f"tasks[{i}].") for i, t in enumerate(body.tasks)]
        ids, _rejected = await self._command(Submit(specs))
        return _json(SubmittedBatch(ids), 201)

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        task_id = self._task_id(request)
        self._require_serving()
        await self._durable()
        task = self.core.sm.get_task(task_id)
        if task is None:
            raise TaskNotFound(f"no task {task_id[:80]}")
        return _json(task_out(task))

    async def cancel_task(self, request: web.Request) -> web.StreamResponse:
        task: Task = await self._command(Cancel(self._task_id(request)))
        return _json(task_out(task))

    async def list_tasks(self, request: web.Request) -> web.StreamResponse:
        q = _query(request, LIST_PARAMS)
        states: tuple[str, ...] = STATES if q["state"] is None else (q["state"],)
        after: str | None = None
        if q["cursor"] is not None:
            state, after = decode_cursor(q["cursor"])
            if state not in states:
                raise FieldError(BadRequest(f"the cursor is for state {state}"), "cursor")
            states = states[states.index(state) :]
        self._require_serving()
        await self._durable()
        tasks, cursor = self._page(states, after, q, q["limit"] or 100)
        return _json(TaskPage([task_out(t, with_payload=False) for t in tasks], cursor))

    def _page(
        self, states: tuple[str, ...], after: str | None, q: dict[str, Any], limit: int
    ) -> tuple[list[Task], str | None]:
        """Up to ``limit`` tasks from ``states`` in order, resuming after ``after``, and the
        cursor of the next page. ``since``/``until`` filter on submitted_at_ms."""
        since, until = q["since"], q["until"]
        out: list[Task] = []
        looked = 0
        i = 0
        while len(out) < limit and looked < LIST_SCAN_BUDGET:
            try:
                page, after = self.core.sm.list_tasks(
                    TaskState(states[i]), q["queue"], q["name"], limit - len(out), after
                )
            except ValueError:
                raise FieldError(
                    BadRequest("cursor is not one this broker returned"), "cursor"
                ) from None
            looked += len(page)
            out += [
                t
                for t in page
                if (since is None or t.submitted_at_ms >= since)
                and (until is None or t.submitted_at_ms < until)
            ]
            if after is None:
                i += 1
                if i == len(states):
                    return out, None
        return out, encode_cursor(states[i], after)

    def _task_id(self, request: web.Request) -> str:
        task_id = request.match_info["task_id"]
        if not valid_task_id(task_id):
            raise FieldError(BadRequest("task_id must be 1-64 of [A-Za-z0-9_.:-]"), "task_id")
        return task_id

    # --- queues, workers, stats, cluster ---------------------------------------------------------

    async def list_queues(self, request: web.Request) -> web.StreamResponse:
        await self._durable()
        now_ms = self.core.clock()
        queues = [
            QueueOut(
                name=name,
                depth=sum(s.pending.values()),
                pending=PriorityDepth(**{p.label: s.pending.get(p.label, 0) for p in Priority}),
                running=s.running,
                delayed=s.delayed,
                oldest_pending_ms=s.oldest_pending_ms,
                oldest_pending_age_s=max(0.0, (now_ms - s.oldest_pending_ms) / 1000)
                if s.oldest_pending_ms
                else 0.0,
                paused=s.paused,
                rate_in=s.rate_in,
                rate_out=s.rate_out,
            )
            for name, s in self.core.queue_stats().items()
        ]
        return _json(QueueList(queues, left_out=self.core.sm.queues_left_out))

    async def pause_queue(self, request: web.Request) -> web.StreamResponse:
        return await self._pause(request, True)

    async def resume_queue(self, request: web.Request) -> web.StreamResponse:
        return await self._pause(request, False)

    async def _pause(self, request: web.Request, paused: bool) -> web.StreamResponse:
        queue = request.match_info["queue"]
        if not valid_name(queue):
            raise FieldError(BadRequest("queue must be 1-200 of [A-Za-z0-9_.:-]"), "queue")
        await self._command(cmds.PauseQueue(queue, paused))
        return _json(QueuePaused(queue, paused))

    async def list_workers(self, request: web.Request) -> web.StreamResponse:
        await self._durable()
        return _json(WorkerList(self.core.sm.worker_infos(self.core.worker_metrics)))

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        # Any node answers (a follower from its local state), as the TCP protocol's stats.
        await self._durable()
        return _json(self.core.stats())

    async def get_cluster(self, request: web.Request) -> web.StreamResponse:
        status = self.core.log.status()
        commit, applied = status.get("commit_index"), status.get("applied_index")
        return _json(
            ClusterOut(
                node_id=self.core.node_id,
                role=str(status.get("role") or "single"),
                leader=status.get("leader_client"),
                term=status.get("term"),
                commit_index=commit,
                applied_index=applied,
                lag=commit - applied if commit is not None and applied is not None else None,
                has_quorum=status.get("has_quorum"),
                peers=status.get("peers") or {},
            )
        )

    # --- dead letters ----------------------------------------------------------------------------

    async def list_dead_letters(self, request: web.Request) -> web.StreamResponse:
        q = _query(request, DEAD_LETTER_PARAMS)
        self._require_serving()
        await self._durable()
        tasks = self._dead_letters(
            None, q["queue"], q["name"], q["error_type"], q["older_than_s"], q["limit"] or 100
        )
        return _json(TaskList([task_out(t, with_payload=False) for t in tasks]))

    async def retry_dead_letters(self, request: web.Request) -> web.StreamResponse:
        return await self._change_dead_letters(request, "retry")

    async def purge_dead_letters(self, request: web.Request) -> web.StreamResponse:
        return await self._change_dead_letters(request, "purge")

    async def _change_dead_letters(self, request: web.Request, op: str) -> web.StreamResponse:
        body = _decode(await self._body(request), DeadLetterChange)
        filtered = any(
            v is not None for v in (body.queue, body.name, body.error_type, body.older_than_s)
        )
        if not (body.ids or filtered or body.all or body.dry_run):
            raise FieldError(
                BadRequest(f"name ids, give a filter, or set all: true to {op} every dead letter"),
                "ids",
            )
        self._require_serving()
        await self._durable()
        tasks = self._dead_letters(
            body.ids, body.queue, body.name, body.error_type, body.older_than_s, int(body.limit)
        )
        ids = [t.id for t in tasks]
        if body.dry_run or not ids:
            return _json(DeadLetterChanged(body.dry_run, ids))
        done: list[str] = await self._command(RetryDead(ids) if op == "retry" else PurgeDead(ids))
        return _json(DeadLetterChanged(False, done))

    def _dead_letters(
        self,
        ids: list[str] | None,
        queue: str | None,
        name: str | None,
        error_type: str | None,
        older_than_s: float | None,
        limit: int,
    ) -> list[Task]:
        return self.core.select_dead(
            ids,
            queue=queue,
            name=name,
            error_type=error_type,
            older_than_s=older_than_s,
            limit=limit,
        )

    # --- operations ------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _json(Health("ok"))

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        leader = core.log.leader_client()
        role = str(core.log.status().get("role") or "single")
        if core.fatal is not None:
            raise BrokerUnavailable(f"the store failed: {core.fatal}")
        if core.closing:
            raise ShuttingDown("broker is shutting down")
        if core.config.clustered and not core.log.is_leader and leader is None:
            raise BrokerUnavailable("no leader is known")
        return _json(Ready(True, role, leader))

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def get_openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._document, headers={"Content-Type": "application/json"})


__all__ = [
    "STATUS_BY_CODE",
    "FieldError",
    "HttpServer",
    "decode_cursor",
    "encode_cursor",
    "problem_for",
    "problem_response",
    "task_out",
]
