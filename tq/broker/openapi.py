"""The HTTP API's contract: request and response types, the route table, and the OpenAPI 3.1
document built from both.

One table drives the server and the document: ``tq/broker/http.py`` binds one handler to each
``Route`` (by ``operation_id``) and decodes bodies and query parameters with the same types and
``Param`` definitions this module turns into JSON Schema, so the document cannot drift from what
the server accepts and returns. Component schemas come from msgspec (``schema_components``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from tq._version import __version__
from tq.broker.tcp import MAX_BATCH, MAX_LIST
from tq.model import DEFAULT_MAX_RETRIES, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S
from tq.protocol.messages import Stats, WorkerInfo

API_PREFIX: Final = "/api/v1"
ID_PATTERN: Final = "^[A-Za-z0-9_.:-]{1,64}$"
NAME_PATTERN: Final = "^[A-Za-z0-9_.:-]{1,200}$"
PROBLEM_JSON: Final = "application/problem+json"
STATES: Final = ("pending", "running", "failed", "completed", "dead", "cancelled")

TaskIdStr = Annotated[str, Meta(pattern=ID_PATTERN, description="1-64 of [A-Za-z0-9_.:-]")]
NameStr = Annotated[str, Meta(pattern=NAME_PATTERN, description="1-200 of [A-Za-z0-9_.:-]")]
PriorityLabel = Literal["high", "normal", "low"]
MAX_AGE_S: Final = 1e10  # older_than_s: anything larger means "all" anyway


# JSON Schema's integer admits 3.0, which a strict msgspec int refuses: whole-number fields are
# floats that must be multiples of 1, documented as integers (``_integers``; handlers use int()).
PriorityNumber = Annotated[float, Meta(ge=0, le=2, multiple_of=1)]
Retries = Annotated[float, Meta(ge=0, le=1000, multiple_of=1)]
Limit = Annotated[float, Meta(ge=1, le=MAX_LIST, multiple_of=1)]


StateName = Literal["pending", "running", "failed", "completed", "dead", "cancelled"]


def _null_payload() -> msgspec.Raw:
    return msgspec.Raw(b"null")


# --- requests ------------------------------------------------------------------------------------


class TaskIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A task to submit. ``payload`` is any JSON value; the handler receives it decoded."""

    name: NameStr
    payload: Annotated[msgspec.Raw, Meta(description="any JSON value (10 MiB at most)")] = (
        msgspec.field(default_factory=_null_payload)
    )
    queue: NameStr = DEFAULT_QUEUE
    priority: PriorityLabel | PriorityNumber = "normal"
    max_retries: Retries = DEFAULT_MAX_RETRIES
    timeout_s: Annotated[float, Meta(gt=0, le=7 * 86400)] = DEFAULT_TIMEOUT_S
    backoff_s: Annotated[float, Meta(ge=0, le=86400)] = 0.0
    id: Annotated[
        TaskIdStr | None,
        Meta(description="the task id; resubmitting an existing id is a no-op (idempotent)"),
    ] = None


class TaskBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    tasks: Annotated[list[TaskIn], Meta(min_length=1, max_length=MAX_BATCH)]


class DeadLetterChange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which dead-lettered tasks to retry or purge: ``ids``, or the filters (all of them must
    match). Without ids or a filter, ``all: true`` is required (``dry_run`` needs neither)."""

    ids: Annotated[list[TaskIdStr], Meta(max_length=MAX_LIST)] | None = None
    queue: NameStr | None = None
    name: NameStr | None = None
    error_type: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    older_than_s: Annotated[float, Meta(ge=0, le=MAX_AGE_S)] | None = None
    limit: Limit = 1000
    dry_run: bool = False
    all: bool = False


# --- responses -----------------------------------------------------------------------------------


class TaskError(msgspec.Struct):
    type: str
    message: str
    traceback: str


class TaskOut(msgspec.Struct):
    """A task. ``payload`` and ``result`` are the JSON values, or base64 strings when the bytes
    are not JSON (``*_encoding`` says which). Lists leave ``payload`` out (null)."""

    id: str
    name: str
    queue: str
    priority: PriorityLabel
    state: StateName
    attempt: int
    max_retries: int
    timeout_s: float
    backoff_s: float
    submitted_at_ms: int
    started_at_ms: int
    finished_at_ms: int
    eta_ms: int
    worker_id: str
    payload: Any
    payload_encoding: Literal["json", "base64"]
    result: Any
    result_encoding: Literal["json", "base64"]
    error: TaskError | None


class Submitted(msgspec.Struct):
    id: str


class SubmittedBatch(msgspec.Struct):
    ids: list[str]


class TaskPage(msgspec.Struct):
    """A page of tasks; pass ``next_cursor`` back as ``cursor`` for the next one (null: the
    end). A page may hold fewer than ``limit`` tasks before the end when time filters skip many."""

    tasks: list[TaskOut]
    next_cursor: str | None


class TaskList(msgspec.Struct):
    tasks: list[TaskOut]


class PriorityDepth(msgspec.Struct):
    high: int
    normal: int
    low: int


class QueueOut(msgspec.Struct):
    name: str
    depth: int
    pending: PriorityDepth
    running: int
    delayed: int
    oldest_pending_ms: int
    oldest_pending_age_s: float
    paused: bool
    rate_in: float  # tasks/s submitted over the last minute
    rate_out: float  # tasks/s completed over the last minute


class QueueList(msgspec.Struct):
    queues: list[QueueOut]
    # Queues not listed: at most 1,000 are (busy first, then the deepest), as in stats.
    left_out: int = 0


class QueuePaused(msgspec.Struct):
    queue: str
    paused: bool


class WorkerList(msgspec.Struct):
    workers: list[WorkerInfo]


class DeadLetterChanged(msgspec.Struct):
    """The ids retried or purged (with ``dry_run``: the ids that would be)."""

    dry_run: bool
    ids: list[str]


class ClusterOut(msgspec.Struct):
    """This node's view. ``role`` is ``single`` for a broker without Raft."""

    node_id: str
    role: str
    leader: str | None
    term: int | None
    commit_index: int | None
    applied_index: int | None
    lag: int | None
    has_quorum: bool | None
    peers: dict[str, Any]


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct):
    ready: bool
    role: str
    leader: str | None


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem. ``code`` is tq's stable error code (the same as the TCP protocol's
    NACKs); ``field`` names the offending input; ``leader`` is where to go for NOT_LEADER."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    field: str | None = None
    leader: str | None = None


# --- the route table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter; the server parses with the same fields the schema states."""

    name: str
    kind: Literal["string", "integer", "number"]
    where: Literal["query", "path"] = "query"
    description: str = ""
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        return out


@dataclass(frozen=True, slots=True)
class Route:
    method: Literal["GET", "POST"]
    path: str
    operation_id: str
    summary: str
    tag: str
    status: int = 200
    response: type[Any] | None = None  # None: a text body (``content_type``)
    content_type: str = "application/json"
    body: type[Any] | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    authenticated: bool = True  # the bearer token is checked when the broker has one


TASK_ID = Param("task_id", "string", "path", "the task id", pattern=ID_PATTERN)
QUEUE = Param("queue", "string", "path", "the queue name", pattern=NAME_PATTERN)
Q_QUEUE = Param("queue", "string", description="only this queue", pattern=NAME_PATTERN)
Q_NAME = Param("name", "string", description="only this task name", pattern=NAME_PATTERN)
LIST_PARAMS: Final = (
    Param("state", "string", description="one state (default: every state)", enum=STATES),
    Q_QUEUE,
    Q_NAME,
    Param("since", "integer", description="submitted at or after (ms since the epoch)", minimum=0),
    Param("until", "integer", description="submitted before (ms since the epoch)", minimum=0),
    Param("limit", "integer", description="page size (default 100)", minimum=1, maximum=MAX_LIST),
    Param("cursor", "string", description="next_cursor of the previous page", max_length=1000),
)
DEAD_LETTER_PARAMS: Final = (
    Q_QUEUE,
    Q_NAME,
    Param("error_type", "string", description="e.g. TIMEOUT, RuntimeError", max_length=200),
    Param(
        "older_than_s",
        "number",
        description="finished more than this long ago",
        minimum=0,
        maximum=MAX_AGE_S,
    ),
    Param(
        "limit",
        "integer",
        description="at most this many (default 100)",
        minimum=1,
        maximum=MAX_LIST,
    ),
)

API = API_PREFIX
ROUTES: Final[tuple[Route, ...]] = (
    Route(
        "POST", f"{API}/tasks", "submitTask", "Submit one task", "tasks",
        status=201, response=Submitted, body=TaskIn, errors=(400, 413, 503),
    ),
    Route(
        "POST", f"{API}/tasks/batch", "submitBatch", "Submit many tasks in one durable write",
        "tasks", status=201, response=SubmittedBatch, body=TaskBatchIn, errors=(400, 413, 503),
    ),
    Route(
        "GET", f"{API}/tasks", "listTasks", "List tasks (cursor pagination)", "tasks",
        response=TaskPage, params=LIST_PARAMS, errors=(400, 503),
    ),
    Route(
        "GET", f"{API}/tasks/{{task_id}}", "getTask", "Get one task", "tasks",
        response=TaskOut, params=(TASK_ID,), errors=(400, 404, 503),
    ),
    Route(
        "POST", f"{API}/tasks/{{task_id}}/cancel", "cancelTask",
        "Cancel a pending or retry-waiting task", "tasks",
        response=TaskOut, params=(TASK_ID,), errors=(400, 404, 409, 503),
    ),
    Route(
        "GET", f"{API}/queues", "listQueues",
        "Queues: depth by priority, oldest pending age, paused", "queues", response=QueueList,
    ),
    Route(
        "POST", f"{API}/queues/{{queue}}/pause", "pauseQueue", "Stop handing out a queue's tasks",
        "queues", response=QueuePaused, params=(QUEUE,), errors=(400, 503),
    ),
    Route(
        "POST", f"{API}/queues/{{queue}}/resume", "resumeQueue", "Hand out a queue's tasks again",
        "queues", response=QueuePaused, params=(QUEUE,), errors=(400, 503),
    ),
    Route(
        "GET", f"{API}/workers", "listWorkers", "Registered workers", "workers",
        response=WorkerList,
    ),
    Route(
        "GET", f"{API}/stats", "getStats", "Counts by state, queues, workers, counters", "stats",
        response=Stats,
    ),
    Route(
        "GET", f"{API}/dead-letters", "listDeadLetters", "Dead-lettered tasks matching filters",
        "dead-letters", response=TaskList, params=DEAD_LETTER_PARAMS, errors=(400, 503),
    ),
    Route(
        "POST", f"{API}/dead-letters/retry", "retryDeadLetters",
        "Send dead-lettered tasks back to pending (attempts reset)", "dead-letters",
        response=DeadLetterChanged, body=DeadLetterChange, errors=(400, 503),
    ),
    Route(
        "POST", f"{API}/dead-letters/purge", "purgeDeadLetters",
        "Delete dead-lettered tasks for good", "dead-letters",
        response=DeadLetterChanged, body=DeadLetterChange, errors=(400, 503),
    ),
    Route(
        "GET", f"{API}/cluster", "getCluster", "This node's cluster status", "cluster",
        response=ClusterOut,
    ),
    Route(
        "GET", "/healthz", "healthz", "The process is up", "ops",
        response=Health, authenticated=False,
    ),
    Route(
        "GET", "/readyz", "readyz", "The store is open (in a cluster: a leader is known)", "ops",
        response=Ready, errors=(503,), authenticated=False,
    ),
    Route(
        "GET", "/metrics", "metrics", "Prometheus metrics", "ops",
        content_type="text/plain",
    ),
    Route(
        "GET", "/openapi.json", "openapi", "This document", "ops",
        response=dict, authenticated=False,
    ),
)  # fmt: skip

_TITLES: Final = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "A request from a web page (an Origin, or a cross-site Sec-Fetch-Site header)",
    404: "Not found",
    408: "The request body did not arrive in time",
    409: "Conflict",
    413: "Payload too large",
    415: "A request body that is not application/json",
    421: "On a broker bound to loopback: a Host header that is not localhost, 127.x.y.z or [::1]",
    503: "Unavailable",
}


def guard_statuses(route: Route) -> set[int]:
    """The refusals of tq/broker/http.py's guard and body reader, which apply to whole classes
    of routes rather than to one: 421 everywhere (DNS rebinding), 403 except on the routes open
    without a token (they answer browsers too), 415 where a body is posted, 408 where one is
    read."""
    out = {421}
    if route.authenticated:
        out.add(403)
    if route.method == "POST":
        out.add(415)
    if route.body is not None:
        out.add(408)
    return out


def _media(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip()


def _integers(schema: Any) -> Any:
    """Every ``number`` that must be a multiple of 1 is documented as an ``integer``."""
    if isinstance(schema, dict):
        out = {k: _integers(v) for k, v in schema.items()}
        if out.get("type") == "number" and out.get("multipleOf") == 1:
            out["type"] = "integer"
            del out["multipleOf"]
        return out
    if isinstance(schema, list):
        return [_integers(v) for v in schema]
    return schema


def build_document(auth: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``ROUTES`` (``auth``: the broker requires a bearer token)."""
    types: list[Any] = [Problem]
    for route in ROUTES:
        types += [t for t in (route.response, route.body) if t not in (None, dict)]
    refs, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(types, refs, strict=True))
    components = _integers(components)
    # What msgspec cannot say: a retry or purge names ids, a filter, ``all`` or ``dry_run``.
    components["DeadLetterChange"]["anyOf"] = [
        {"required": ["ids"], "properties": {"ids": {"type": "array", "minItems": 1}}},
        *(
            {"required": [f], "properties": {f: {"type": t}}}
            for f, t in (
                ("queue", "string"),
                ("name", "string"),
                ("error_type", "string"),
                ("older_than_s", "number"),
            )
        ),
        {"required": ["all"], "properties": {"all": {"const": True}}},
        {"required": ["dry_run"], "properties": {"dry_run": {"const": True}}},
    ]
    problem = {PROBLEM_JSON: {"schema": ref_of[Problem]}}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        if route.response is None:
            ok_schema: dict[str, Any] = {"type": "string"}
        elif route.response is dict:
            ok_schema = {"type": "object"}
        else:
            ok_schema = ref_of[route.response]
        responses: dict[str, Any] = {
            str(route.status): {
                "description": route.summary,
                "content": {_media(route.content_type): {"schema": ok_schema}},
            }
        }
        statuses = set(route.errors) | guard_statuses(route)
        if auth and route.authenticated:
            statuses.add(401)
        for status in sorted(statuses):
            responses[str(status)] = {"description": _TITLES[status], "content": problem}
        responses["default"] = {"description": "any other error", "content": problem}
        op: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag],
            "responses": responses,
        }
        if route.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "description": p.description,
                    "schema": p.schema(),
                }
                for p in route.params
            ]
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[route.body]}},
            }
        if not route.authenticated:
            op["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tq HTTP API",
            "version": __version__,
            "description": "The broker's HTTP face: the same state machine as the TCP protocol. "
            "Errors are application/problem+json (RFC 9457) with tq's stable `code`. Request "
            "bodies must be application/json; requests from web pages (an Origin, or a "
            "Sec-Fetch-Site other than same-origin or none) are refused except by the probes "
            "and this document.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


__all__ = [
    "API_PREFIX",
    "PROBLEM_JSON",
    "ROUTES",
    "STATES",
    "ClusterOut",
    "DeadLetterChange",
    "DeadLetterChanged",
    "Health",
    "Param",
    "PriorityDepth",
    "Problem",
    "QueueList",
    "QueueOut",
    "QueuePaused",
    "Ready",
    "Route",
    "Submitted",
    "SubmittedBatch",
    "TaskBatchIn",
    "TaskError",
    "TaskIn",
    "TaskList",
    "TaskOut",
    "TaskPage",
    "WorkerList",
    "build_document",
]
