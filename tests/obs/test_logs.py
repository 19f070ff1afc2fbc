"""kvd.logs: structlog + stdlib logging in one pipeline; JSON lines under systemd, readable on a TTY."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from kvd.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be exactly one JSON object."""
    out = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        out.append(obj)
    return out


def test_json_one_object_per_event_with_bound_context() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log = get_logger("kvd.test", component="unit")
    structlog.contextvars.bind_contextvars(room=42)
    log.bind(peer="tcp://10.0.0.2:7000").info("room_state", state="transferring", bytes=1024)
    structlog.contextvars.unbind_contextvars("room")
    log.warning("after_unbind")

    first, second = json_lines(out.getvalue())
    assert first["event"] == "room_state"
    assert first["room"] == 42 and first["peer"] == "tcp://10.0.0.2:7000"
    assert first["state"] == "transferring" and first["bytes"] == 1024
    assert first["component"] == "unit"
    assert first["level"] == "info" and first["logger"] == "kvd.test"
    assert first["timestamp"].endswith("Z") or "+00:00" in first["timestamp"]  # UTC, ISO-8601
    # Timestamp, level, logger and event come first, so a line reads left to right.
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]

    assert second["event"] == "after_unbind" and second["level"] == "warning"
    assert "room" not in second and "peer" not in second  # .bind() made a new logger; log is unchanged


def test_json_exceptions_stay_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    log = get_logger("kvd.test")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("handler_failed", room=3)
    (line,) = json_lines(out.getvalue())
    assert line["event"] == "handler_failed" and line["room"] == 3 and line["level"] == "error"
    assert "ValueError" in line["exception"] and "Traceback" in line["exception"]


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    get_logger("kvd.test").info("dropped")
    logging.getLogger("some.lib").info("dropped too")
    get_logger("kvd.test").error("kept")
    assert [e["event"] for e in json_lines(out.getvalue())] == ["kept"]


def test_stdlib_logging_goes_through_the_same_pipeline() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    structlog.contextvars.bind_contextvars(room=7, peer="tcp://p:1")
    logging.getLogger("zmq.something").warning("socket %s closed after %d s", "router", 3)
    (line,) = json_lines(out.getvalue())
    assert line["event"] == "socket router closed after 3 s"  # %-args applied
    assert line["logger"] == "zmq.something" and line["level"] == "warning"
    assert line["room"] == 7 and line["peer"] == "tcp://p:1"  # context reaches library lines too
    assert "timestamp" in line


def test_console_is_human_readable() -> None:
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    structlog.contextvars.bind_contextvars(room=5)
    get_logger("kvd.test").info("room_state", peer="tcp://x:1", state="success")
    logging.getLogger("some.lib").warning("library says %s", "hi")
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2
    assert not lines[0].lstrip().startswith("{")
    assert "room_state" in lines[0] and "room=5" in lines[0] and "state=success" in lines[0]
    assert "peer=tcp://x:1" in lines[0] and "info" in lines[0]
    assert "library says hi" in lines[1] and "warning" in lines[1]
    assert "\x1b[" not in text  # not a TTY: no colour codes


def test_auto_picks_json_when_not_a_tty() -> None:
    out = io.StringIO()
    configure_logging("auto", stream=out)
    get_logger("kvd.test").info("hello", room=1)
    (line,) = json_lines(out.getvalue())
    assert line["event"] == "hello"


def test_reconfiguring_replaces_the_handler_instead_of_duplicating() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)
    get_logger("kvd.test").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second.getvalue())) == 1


def test_bad_format_and_level_are_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "loud")


# --- end to end -------------------------------------------------------------------------------


def daemon_events(text: str) -> list[dict[str, Any]]:
    """kvd's JSON lines from a daemon log; Mooncake's own glog lines (not JSON) are skipped."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.e2e
def test_daemon_writes_json_lines_and_logs_the_transport(daemons: Callable[..., Any]) -> None:
    d = daemons("logs")
    deadline = time.monotonic() + 5
    while True:  # the fixture's status request is logged as a connection; wait for it to land
        events = daemon_events(d.log())
        if any(e.get("event") == "engine_disconnected" for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert events, d.log()
    for e in events:
        assert {"timestamp", "level", "logger", "event"} <= set(e), e

    ready = [e for e in events if e["event"] == "transport_ready"]
    assert len(ready) == 1, d.log()
    assert ready[0]["protocol"] == "tcp"  # what Mooncake actually uses is said at start
    assert ready[0]["socket"] == d.socket_path
    assert ready[0]["peer_address"] == d.address
    assert ready[0]["logger"] == "kvd.daemon" and ready[0]["level"] == "info"

    # Bound per-connection context (log.bind) is on every line of that connection.
    connected = [e for e in events if e["event"] == "engine_connected"]
    assert connected, d.log()
    assert connected[0]["peer_pid"] == os.getpid() and isinstance(connected[0]["conn"], int)
