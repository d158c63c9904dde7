"""Handlers that misbehave in every way a handler can, for tests/integration/test_worker_faults.py
(``tq worker --app <this file>``). Each must cost only its own task, never the worker."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tq.worker.registry import task


class Fatal(BaseException):
    """Not an Exception: escapes ``except Exception``."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this __str__ is broken")


@task(name="faulty.base_exception")
def base_exception(payload: Any) -> None:
    raise Fatal("below Exception")


@task(name="faulty.unprintable")
def unprintable(payload: Any) -> None:
    raise Unprintable()


@task(name="faulty.sys_exit")
def sys_exit(payload: Any) -> None:
    raise SystemExit(2)  # what argparse does with bad input


@task(name="faulty.async_sys_exit")
async def async_sys_exit(payload: Any) -> None:
    raise SystemExit(3)


@task(name="faulty.keyboard_interrupt")
async def keyboard_interrupt(payload: Any) -> None:
    raise KeyboardInterrupt


@task(name="faulty.cancelled")
async def cancelled(payload: Any) -> None:
    raise asyncio.CancelledError


@task(name="faulty.own_timeout")
async def own_timeout(payload: Any) -> None:
    raise TimeoutError("the handler's own call timed out")


@task(name="faulty.unserializable")
def unserializable(payload: Any) -> object:
    return object()


@task(name="faulty.big_result")
def big_result(payload: dict[str, int]) -> str:
    return "x" * payload["bytes"]


@task(name="faulty.big_error")
def big_error(payload: dict[str, int]) -> None:
    raise ValueError("y" * payload["bytes"])


@task(name="faulty.hang")
def hang(payload: dict[str, float]) -> None:
    time.sleep(payload["seconds"])  # a blocking call: the thread cannot be stopped


@task(name="faulty.quick")
def quick(payload: Any) -> Any:
    return payload


def logged(fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Callable[[Any], Any]:
    """A plain (not async) decorator around an async function, as many libraries write them."""

    @functools.wraps(fn)
    def wrapper(payload: Any) -> Any:
        return fn(payload)

    return wrapper


@task(name="faulty.wrapped_async")
@logged
async def wrapped_async(payload: Any) -> Any:
    await asyncio.sleep(0)
    return {"awaited": payload}


class AsyncCallable:
    async def __call__(self, payload: Any) -> Any:
        return {"called": payload}


task(name="faulty.async_callable")(AsyncCallable())
