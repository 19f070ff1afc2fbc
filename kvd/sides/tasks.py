"""One owner for every background task: it keeps a reference, cancels at shutdown, reports crashes.

``asyncio.create_task`` with no reference kept can be garbage-collected mid-flight, and an
exception in it is only reported when the task is collected, if ever. Every coroutine the
daemon starts in the background goes through :meth:`TaskOwner.spawn` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("kvd.tasks")


class TaskOwner:
    """Keeps, names, cancels and reports the tasks it spawned."""

    def __init__(self, on_crash: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_crash = on_crash
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start ``coro`` now; a crash is logged and counted, never lost."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"task owner is closed: {name} not started")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_crashed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}",
                      exc_info=exc)
            if self._on_crash is not None:
                self._on_crash(task.get_name(), exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait (bounded) for them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


__all__ = ["TaskOwner"]
