"""Value parsers of kvd's configuration (:mod:`kvd.core.config`): each accepts the TOML type
*or* a string (env vars and flags) and returns the typed value, or raises ``ValueError`` with
what was expected; the loader prefixes it with where the value came from. Pure: no I/O.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the trailing NUL


class _Invalid(ValueError):
    """A parser's complaint about one value; the caller prefixes it with the source."""


# --- value parsers: accept the TOML type *or* a string (env vars and flags), return the typed value ---


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _nonempty_str(value: object) -> str:
    text = _str(value).strip()
    if not text:
        raise _Invalid("must not be empty")
    return text


def _hostname(value: object) -> str:
    text = _nonempty_str(value)
    if any(c.isspace() for c in text):
        raise _Invalid(f"expected a host name or address, got {_show(value)}")
    return text


def _int(value: object, *, low: int, high: int | None, what: str) -> int:
    bad = _Invalid(f"expected {what}, got {_show(value)}")  # always quote what the operator wrote
    if isinstance(value, bool):  # bool is an int subclass; true/false is never a count
        raise bad
    number: object = value
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip().replace("_", ""), 10)
        except ValueError:
            raise bad from None
    if not isinstance(number, int) or number < low or (high is not None and number > high):
        raise bad
    return number


def _positive_int(value: object) -> int:
    return _int(value, low=1, high=None, what="a positive integer")


def _run_count(value: object) -> int:
    return _int(value, low=0, high=1024, what="a number of runs 0-1024")


def _port(value: object) -> int:
    return _int(value, low=0, high=65535, what="a port number 0-65535 (0 = pick a free port)")


def _positive_float(value: object) -> float:
    what = "a positive number"
    if isinstance(value, bool):
        raise _Invalid(f"expected {what}, got {_show(value)}")
    number: float
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Invalid(f"expected {what}, got {_show(value)}") from None
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if not math.isfinite(number) or number <= 0:
        raise _Invalid(f"expected {what}, got {_show(value)}")
    return number


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Invalid(f"expected true or false (also 1/0, yes/no, on/off), got {_show(value)}")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _str(value).strip().lower()
        if text not in choices:
            raise _Invalid(f"expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}")
        return text

    return parse


_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}


def _log_level(value: object) -> str:
    text = _str(value).strip().lower()
    return _choice("debug", "info", "warning", "error", "critical")(_LEVEL_ALIASES.get(text, text))


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Parse a byte count: an int, or a string like ``"4GiB"``, ``"64MiB"``, ``"1.5G"``, ``"500MB"``.

    KiB/MiB/GiB/TiB and the bare K/M/G/T are powers of 1024 (as systemd reads them);
    KB/MB/GB/TB are powers of 1000. Raises ``ValueError`` on anything else.
    """
    what = "a positive byte size such as 4294967296, '4GiB' or '64MiB'"
    if isinstance(value, bool):
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value.replace("_", ""))
        unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise _Invalid(f"expected {what}, got {_show(value)}")
        size = int(float(match.group(1)) * unit) if "." in match.group(1) else int(match.group(1)) * unit
    else:
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if size <= 0:
        raise _Invalid(f"expected {what}, got {_show(value)}")
    return size


AUTO = -1  # an "auto" size: resolved from other settings (see Config.inline_limit)


def _size_or_zero(value: object) -> int:
    """A byte size, or 0 to turn the feature off."""
    return 0 if value == 0 or value == "0" else parse_size(value)


def _size_zero_or_auto(value: object) -> int:
    """A byte size, 0 to turn the feature off, or "auto" (kept as AUTO)."""
    if value == "auto" or (value == AUTO and not isinstance(value, bool)):
        return AUTO
    return 0 if value == 0 or value == "0" else parse_size(value)


def _socket_mode(value: object) -> int:
    what = 'a file mode such as "0660" (octal string) or 0o660'
    if isinstance(value, bool):
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise _Invalid(f"expected {what}, got {_show(value)}")
        mode = int(text, 8)
    elif isinstance(value, int):
        mode = value
    else:
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if not 0 <= mode <= 0o777:
        # A TOML integer 660 is decimal 660 = 0o1224: say how to write it instead.
        raise _Invalid(
            f'expected {what}, got {_show(value)} (an integer is read as decimal: write "0660" or 0o660)'
        )
    if mode & 0o002:
        # Any local user could then drive transfers into GPU memory (design: Trust).
        raise _Invalid(f"must not be world-writable, got {oct(mode)}")
    if (mode & 0o600) != 0o600:
        raise _Invalid(f"the owner (kvd) needs read and write, got {oct(mode)}")
    return mode


def _socket_path(value: object) -> str:
    text = _nonempty_str(value)
    if len(os.fsencode(text)) > _MAX_UNIX_PATH:
        raise _Invalid(
            f"a Unix socket path may be at most {_MAX_UNIX_PATH} bytes, got {len(os.fsencode(text))}"
        )
    return text


def _devices(value: object) -> str:
    items = [item.strip() for item in _str(value).split(",")]
    if items == [""]:
        return ""
    for item in items:
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", item):
            raise _Invalid(
                f"expected a comma-separated RDMA device list such as 'mlx5_0,mlx5_1', got {_show(value)}"
            )
    return ",".join(items)


def _id_list(value: object) -> str:
    """A comma-separated list of numeric uids/gids ("" = no list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    items = [item.strip() for item in _str(value).split(",")]
    if items == [""]:
        return ""
    if not all(item.isdigit() and item.isascii() for item in items):
        raise _Invalid(f"expected comma-separated numeric ids such as '1000,1001', got {_show(value)}")
    return ",".join(str(int(item)) for item in items)


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9400"`` for IPv6; empty host = all interfaces).

    Raises ``ValueError`` when the port is missing or out of range.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise _Invalid(f"expected 'host:port', got {_show(text)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = _int(port_text, low=0, high=65535, what="a port")
    except _Invalid:
        raise _Invalid(f"expected 'host:port' with a port 0-65535, got {_show(text)}") from None
    return host, port


def _address(value: object) -> str:
    text = _str(value).strip()
    if text:
        parse_host_port(text)
    return text
