"""The one error tree of tq.

Every class carries a stable ``code``: the broker sends it in a NACK, and the client maps it back
to the same class, so callers catch the error the broker raised, not a transport wrapper::

    TqError
    +-- ProtocolError          (FRAME_TOO_LARGE, BAD_FRAME, UNKNOWN_MESSAGE, UNSUPPORTED_VERSION)
    +-- BadRequest             (BAD_REQUEST)
    |   +-- PayloadTooLarge    (PAYLOAD_TOO_LARGE)
    +-- TaskNotFound           (TASK_NOT_FOUND)
    +-- InvalidState           (INVALID_STATE)
    +-- LeaseLost              (LEASE_LOST)
    +-- NotLeader              (NOT_LEADER)
    |   +-- OutcomeUnknown     (OUTCOME_UNKNOWN: it stopped leading after taking the request)
    +-- Unauthenticated        (UNAUTHENTICATED)
    +-- ShuttingDown           (SHUTTING_DOWN)
    +-- WaitTimeout            (WAIT_TIMEOUT)
    +-- BrokerUnavailable      (UNAVAILABLE: cannot reach the broker)
    +-- InternalError          (INTERNAL)
"""

from __future__ import annotations


class TqError(Exception):
    """Root of every error tq raises on purpose."""

    code: str = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class ProtocolError(TqError):
    code = "BAD_FRAME"


class FrameTooLarge(ProtocolError):
    code = "FRAME_TOO_LARGE"


class UnknownMessage(ProtocolError):
    code = "UNKNOWN_MESSAGE"


class UnsupportedVersion(ProtocolError):
    code = "UNSUPPORTED_VERSION"


class BadRequest(TqError):
    code = "BAD_REQUEST"


class PayloadTooLarge(BadRequest):
    code = "PAYLOAD_TOO_LARGE"


class TaskNotFound(TqError):
    code = "TASK_NOT_FOUND"


class InvalidState(TqError):
    code = "INVALID_STATE"


class LeaseLost(TqError):
    """A result or heartbeat came from an expired or superseded lease (fencing token mismatch)."""

    code = "LEASE_LOST"


class NotLeader(TqError):
    code = "NOT_LEADER"

    def __init__(self, message: str = "", leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class OutcomeUnknown(NotLeader):
    """The node stopped leading after it took the request: a later leader may still apply it.
    Clients send again only what is safe to repeat (a submit, by its id); a cancel sent again
    after it took effect answered INVALID_STATE, which read as a failure."""

    code = "OUTCOME_UNKNOWN"


class Unauthenticated(TqError):
    code = "UNAUTHENTICATED"


class ShuttingDown(TqError):
    code = "SHUTTING_DOWN"


class WaitTimeout(TqError):
    code = "WAIT_TIMEOUT"


class BrokerUnavailable(TqError):
    code = "UNAVAILABLE"


class InternalError(TqError):
    code = "INTERNAL"


def _all_subclasses(cls: type[TqError]) -> list[type[TqError]]:
    out: list[type[TqError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[TqError]] = {c.code: c for c in _all_subclasses(TqError)}
ERRORS_BY_CODE["INTERNAL"] = InternalError


def error_from_code(code: str, message: str) -> TqError:
    """Rebuild the exception the broker raised from its NACK code."""
    return ERRORS_BY_CODE.get(code, InternalError)(message)
