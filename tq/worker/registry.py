"""Handlers by task name. ``@task`` registers a function in the default registry; the worker
imports ``--app`` modules so their decorators run."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from tq.model import valid_name

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Handler:
    name: str
    fn: Callable[[Any], Any]
    is_async: bool


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, fn: Callable[[Any], Any]) -> None:
        if not valid_name(name):
            raise ValueError(f"task name {name!r} must be 1-200 of [A-Za-z0-9_.:-]")
        self._handlers[name] = Handler(name, fn, _is_async(fn))

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)


def _is_async(fn: Callable[[Any], Any]) -> bool:
    """Whether to run ``fn`` on the event loop: an ``async def``, one behind a plain decorator
    (``functools.wraps`` leaves ``__wrapped__``), or an object whose ``__call__`` is async.
    (Whatever slips through still works: the worker awaits an awaitable a handler returns.)"""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn)):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - the method itself is what is inspected
    return call is not None and inspect.iscoroutinefunction(call)


registry = Registry()


@overload
def task(fn: F, /) -> F: ...
@overload
def task(*, name: str | None = None) -> Callable[[F], F]: ...


def task(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a handler: ``@task`` or ``@task(name="emails.send")``.

    The handler gets the task's decoded payload as its one argument and returns a
    JSON-serializable result. ``async def`` handlers run on the worker's event loop; plain ones
    in its thread pool."""

    def deco(f: F) -> F:
        registry.register(name or f.__name__, f)
        return f

    return deco(fn) if fn is not None else deco


def import_app(module: str) -> None:
    """Import a module of handlers (``package.module`` or ``path/to/file.py``)."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(module.rsplit("/", 1)[-1][:-3], module)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(module)
