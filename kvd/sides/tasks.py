"""One owner for every background task and loop: it keeps, cancels and reports them, and knows
when the daemon can no longer do its job.

``asyncio.create_task`` with no reference kept can be garbage-collected mid-flight, and an
exception in it is only reported when the task is collected, if ever. Every coroutine the
daemon starts in the background goes through :meth:`TaskOwner.spawn` instead.

Two kinds of failure, never a silent half-death:

* one pass of a long-lived loop fails (a bug, a bad peer message): :meth:`TaskOwner.guard`
  logs it with its traceback, counts it, and the loop goes on; a loop whose passes keep
  failing (``max_failures`` in a row) is as good as dead and becomes fatal;
* a *critical* task (a loop the daemon cannot serve without: peer receive, housekeeping)
  ends for any reason while the owner is open: fatal. :attr:`TaskOwner.fatal` is set with the
  reason and the daemon exits non-zero, so that systemd restarts it.

This module never decides what a loop does, and never swallows ``CancelledError``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger("kvd.tasks")

#: Failed passes in a row after which a guarded loop counts as dead (fatal).
MAX_FAILURES = 100


class TaskOwner:
    """Keeps, names, cancels and reports the tasks it spawned; see the module docstring."""

    def __init__(self, on_crash: Callable[[str, BaseException], None] | None = None,
                 max_failures: int = MAX_FAILURES) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: set[asyncio.Task[Any]] = set()
        self._on_crash = on_crash
        self._closed = False
        self._max_failures = max_failures
        self._in_a_row: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # every failure ever logged, by task or loop name
        self.fatal_reason: str | None = None
        self._fatal: asyncio.Event | None = None
        self._fatal_hooks: list[Callable[[str], None]] = []

    # --- tasks --------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, critical: bool = False) -> asyncio.Task[Any]:
        """Start ``coro`` now; a crash is logged and counted, never lost. A ``critical`` task
        that ends at all (crash or return) while the owner is open makes the daemon fatal."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"task owner is closed: {name} not started")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        critical = task in self._critical
        self._critical.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._report(task.get_name(), exc, "task_crashed")
        if critical and not self._closed:
            why = f"{type(exc).__name__}: {exc}" if exc is not None else \
                "cancelled" if task.cancelled() else "returned"
            self.die(f"critical task {task.get_name()} ended ({why})")

    def _report(self, name: str, exc: BaseException, event: str) -> None:
        self.failures[name] += 1
        log.error(event, task=name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        if self._on_crash is not None:
            try:
                self._on_crash(name, exc)
            except Exception:  # a broken counter must not hide the crash it reports
                log.exception("crash_report_failed", task=name)

    # --- loops ----------------------------------------------------------------------------------
    def guard(self, name: str) -> _Guard:
        """``with owner.guard("housekeeping.expire"): ...``: an exception in the block is logged
        with its traceback and counted, and the caller carries on; ``max_failures`` failures of
        the same name in a row are fatal (a loop that only fails is not doing its work)."""
        return _Guard(self, name)

    def _guard_ok(self, name: str) -> None:
        if self._in_a_row[name]:
            del self._in_a_row[name]

    def _guard_failed(self, name: str, exc: BaseException) -> None:
        self._report(name, exc, "loop_pass_failed")
        self._in_a_row[name] += 1
        if self._in_a_row[name] >= self._max_failures:
            self.die(f"{name} failed {self._in_a_row[name]} times in a row")

    def healthy(self, name: str) -> bool:
        """False while the last pass of ``name`` failed (the watchdog is not pinged for it)."""
        return self._in_a_row[name] == 0

    # --- fatal ----------------------------------------------------------------------------------
    def die(self, reason: str) -> None:
        """The daemon cannot do its job any more: record why, wake :meth:`wait_fatal`."""
        if self.fatal_reason is not None or self._closed:
            return
        self.fatal_reason = reason
        log.critical("daemon_fatal", reason=reason)
        if self._fatal is not None:
            self._fatal.set()
        for hook in self._fatal_hooks:
            hook(reason)

    def on_fatal(self, hook: Callable[[str], None]) -> None:
        self._fatal_hooks.append(hook)
        if self.fatal_reason is not None:
            hook(self.fatal_reason)

    async def wait_fatal(self) -> str:
        if self._fatal is None:
            self._fatal = asyncio.Event()
            if self.fatal_reason is not None:
                self._fatal.set()
        await self._fatal.wait()
        assert self.fatal_reason is not None
        return self.fatal_reason

    # --- bookkeeping ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    def critical_alive(self) -> bool:
        """True while every critical task runs and nothing was fatal."""
        return self.fatal_reason is None and all(not t.done() for t in self._critical)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait (bounded) for them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


class _Guard:
    """The context manager :meth:`TaskOwner.guard` returns."""

    def __init__(self, owner: TaskOwner, name: str) -> None:
        self._owner = owner
        self._name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None:
            self._owner._guard_ok(self._name)
            return False
        if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, SystemExit
            return False
        self._owner._guard_failed(self._name, exc)
        return True


__all__ = ["MAX_FAILURES", "TaskOwner"]
