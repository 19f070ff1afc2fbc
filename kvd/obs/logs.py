"""Logging set-up: structlog for kvd's own events, with the stdlib ``logging`` routed through it.

One pipeline renders both, so a line from a library (ZMQ, asyncio, prometheus_client)
looks like a kvd line: ISO-8601 UTC timestamp, level, logger name, and every key bound
with ``structlog.contextvars.bind_contextvars(room=..., peer=...)`` or ``log.bind(...)``.
Human-readable on a terminal, one JSON object per line otherwise (under systemd the
journal gets JSON). Logs go to stderr; this module never touches the config or sockets.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging", "get_logger"]

FORMATS = ("auto", "console", "json")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _KvdHandler(logging.StreamHandler[TextIO]):
    """Our root handler, a distinct type so that re-configuring replaces it and nothing else."""


def _shared_processors() -> list[Processor]:
    # Run for structlog events and for stdlib records alike ("foreign_pre_chain").
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def _leading_keys_first(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """Put timestamp, level, logger and event first, so JSON lines read left to right."""
    head = {k: event.pop(k) for k in _LEADING_KEYS if k in event}
    return {**head, **event}


def _renderer(fmt: str, stream: TextIO) -> list[Processor]:
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if fmt == "console" or (fmt == "auto" and is_tty):
        # ConsoleRenderer formats exceptions itself; colour only when a human is looking.
        return [structlog.dev.ConsoleRenderer(colors=is_tty)]
    # JSON: tracebacks become one "exception" string field, so a line stays one line.
    return [
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
        _leading_keys_first,
        structlog.processors.JSONRenderer(),
    ]


def configure_logging(fmt: str = "auto", level: str = "info", *, stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger; safe to call again (e.g. in tests).

    ``fmt``: "auto" (console on a TTY, JSON otherwise), "console" or "json".
    ``level``: "debug", "info", "warning", "error" or "critical". ``stream``: default stderr.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    out = stream if stream is not None else sys.stderr
    shared = _shared_processors()

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(fmt, out)],
    )
    handler = _KvdHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _KvdHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # drop disabled levels before any formatting work
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        # Not cached: module-level loggers made before configure_logging() (and tests that
        # re-configure) must pick up the current pipeline.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A logger named ``name`` (use ``__name__``), with ``initial`` key/values bound."""
    return structlog.stdlib.get_logger(name, **initial)
