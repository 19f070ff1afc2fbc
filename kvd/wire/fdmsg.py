"""The fd hand-over message: how an engine passes its host pool to kvd as a file descriptor.

asyncio streams drop ancillary data, so descriptors do not travel on the engine socket itself:
they go over a second Unix socket beside it (:func:`fd_socket_path`, SOCK_SEQPACKET, same mode
and group), one descriptor per connection, with SCM_RIGHTS. The engine sends ``MAGIC`` and the
descriptor; kvd answers ``OK <ticket>`` (or ``ERR <reason>``) and keeps the descriptor for a
few seconds under that ticket, for the same uid only. The engine then registers its pool on
the engine socket with ``memory = {"kind": "fd", "ticket": ticket, "offsets": [...]}``.

Format only: this module never touches a socket.
"""

from __future__ import annotations

#: What the engine sends with the descriptor (version 1).
MAGIC = b"KVDFD1"
#: Suffix of the hand-over socket's path (beside the engine socket).
SUFFIX = ".fds"
#: Longest reply kvd sends.
MAX_REPLY = 512
#: Hex characters of a ticket (128 random bits).
TICKET_CHARS = 32


def fd_socket_path(socket_path: str) -> str:
    """The hand-over socket of the engine socket at ``socket_path``."""
    return socket_path + SUFFIX


def ok_reply(ticket: str) -> bytes:
    return b"OK " + ticket.encode("ascii")


def error_reply(reason: str) -> bytes:
    return (b"ERR " + reason.encode("utf-8", "replace"))[:MAX_REPLY]


def parse_reply(data: bytes) -> tuple[str, str]:
    """``("ok", ticket)`` or ``("error", reason)``; anything else is ``("error", ...)``."""
    if data.startswith(b"OK "):
        ticket = data[3:].decode("ascii", "replace")
        if len(ticket) == TICKET_CHARS and all(c in "0123456789abcdef" for c in ticket):
            return "ok", ticket
    if data.startswith(b"ERR "):
        return "error", data[4:].decode("utf-8", "replace")
    return "error", f"unexpected reply {data[:40]!r}"


def is_ticket(value: object) -> bool:
    return isinstance(value, str) and len(value) == TICKET_CHARS and all(c in "0123456789abcdef" for c in value)


__all__ = ["MAGIC", "MAX_REPLY", "SUFFIX", "TICKET_CHARS", "error_reply", "fd_socket_path", "is_ticket",
           "ok_reply", "parse_reply"]
