"""Message <-> bytes: the Message base, the registry of message types, encode and decode.

Sans-IO (like h11): this module turns message objects into bytes and bytes into message
objects; it never touches a socket, asyncio, zmq or torch, and never frames a stream
(``framing`` does).

Wire form of every message: a msgpack array
``[header_version, message_type, field_0, field_1, ...]`` with the fields in the order the
message class declares them (base class fields first, as ``dataclasses.fields`` lists them).
The rules that keep peers of different releases talking:

* fields are only ever appended; a field added after version 1 has a default;
* a decoder ignores trailing fields it does not know (a newer peer);
* a decoder fills defaults for fields the sender did not send (an older peer);
* anything else (wrong type, unknown message type, truncated or non-msgpack bytes, a missing
  field that the wire requires) raises one :class:`ProtocolError` that names the message and
  the field.

See ``fields`` for how ``since``, ``PROTOCOL_VERSION`` and the header byte relate.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import msgpack

from kvd.wire.fields import HEADER_VERSION, KINDS, Field, declared_field, is_classvar


class ProtocolError(ValueError):
    """Bytes that are not a valid kvd message; names the message and the field at fault."""

    def __init__(self, message: str, *, msg_type: str | None = None, field_name: str | None = None):
        where = ".".join(p for p in (msg_type, field_name) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.msg_type = msg_type
        self.field_name = field_name


_REGISTRY: dict[int, type[Message]] = {}


class Message:
    """Base of every message. A concrete message is a frozen dataclass
    (``@dataclass(frozen=True, eq=False, kw_only=True)``) that sets TYPE, a stable small int.

    FIELDS, the wire fields in order, is derived from the annotations when the class is
    created; that is also when a bad annotation, ``since`` or duplicate TYPE is refused, so a
    mistake fails at import rather than on the first message."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.FIELDS = _declared_fields(cls)
        type_id = cls.__dict__.get("TYPE")
        if type_id is None:
            return  # an abstract base such as PeerMessage
        if isinstance(type_id, bool) or not isinstance(type_id, int):
            raise TypeError(f"{cls.__name__}.TYPE must be an int, not {type_id!r}")
        if type_id in _REGISTRY:
            raise ValueError(f"message type {type_id} declared twice ({_REGISTRY[type_id].__name__}, "
                             f"{cls.__name__})")
        _REGISTRY[type_id] = cls
        _HAS_POST_INIT[cls] = hasattr(cls, "__post_init__") or hasattr(cls, "__slots__")

    def encode(self) -> bytes:
        return encode(self)


def _declared_fields(cls: type[Message]) -> tuple[Field, ...]:
    """The wire fields of ``cls``: its Message base's, then its own annotated ones, in the
    order ``dataclasses.fields`` will list them once the dataclass decorator has run."""
    bases = [b for b in cls.__bases__ if issubclass(b, Message)]
    if len(bases) != 1:
        raise TypeError(f"{cls.__name__}: a message derives from exactly one message class")
    fields = {f.name: f for f in bases[0].FIELDS}
    own = cls.__dict__.get("__annotations__", {})
    if own:
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # NameError & co. from a string annotation
            raise TypeError(f"{cls.__name__}: cannot resolve annotations ({exc})") from None
        for name in own:
            if is_classvar(hints[name]):
                continue
            value = cls.__dict__.get(name, dataclasses.MISSING)
            fields[name] = declared_field(cls.__name__, name, hints[name], value)
    out = tuple(fields.values())
    for before, after in zip(out, out[1:], strict=False):
        if after.since < before.since:
            raise ValueError(f"{cls.__name__}.{after.name} (since {after.since}) follows "
                             f"{before.name} (since {before.since}): fields are only appended")
    return out


def field_names(cls: type[Message]) -> list[str]:
    """The wire fields of ``cls``, in wire order."""
    return [f.name for f in cls.FIELDS]


def message_types() -> dict[int, type[Message]]:
    """Every registered message class by TYPE (a copy)."""
    return dict(_REGISTRY)


def encode(msg: Message) -> bytes:
    """Message -> msgpack bytes (header first, fields in declared order)."""
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "TYPE", -1)) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered message type")
    plan = _ENCODERS.get(cls)
    if plan is None:
        plan = _ENCODERS[cls] = tuple((f.name, KINDS[f.kind].encode) for f in cls.FIELDS)
    out: list[Any] = [HEADER_VERSION, cls.TYPE]
    values = msg.__dict__
    try:
        for name, to_wire in plan:
            out.append(to_wire(values[name]))
    except (TypeError, ValueError) as exc:
        name = plan[len(out) - 2][0]
        raise ProtocolError(f"cannot encode {values[name]!r}: {exc}", msg_type=cls.__name__,
                            field_name=name) from None
    data: bytes = msgpack.packb(out, use_bin_type=True)
    return data


def decode(data: bytes) -> Message:
    """msgpack bytes -> Message, tolerant of newer (extra fields) and older (defaults) peers."""
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(items, list) or len(items) < 2:
        raise ProtocolError("a message is an array [version, type, fields...]")
    version, type_id = items[0], items[1]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ProtocolError(f"bad protocol version {version!r}", field_name="version")
    cls = _REGISTRY.get(type_id) if isinstance(type_id, int) and not isinstance(type_id, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_id!r}", field_name="type")
    values = items[2:]
    plan = _DECODERS.get(cls)
    if plan is None:
        plan = _DECODERS[cls] = tuple((f.name, KINDS[f.kind].check, f.required) for f in cls.FIELDS)
    kwargs: dict[str, Any] = {}
    try:
        for (name, check, _), value in zip(plan, values, strict=False):
            kwargs[name] = check(value)
    except TypeError as exc:
        name = plan[len(kwargs)][0]
        raise ProtocolError(f"{exc}, got {type(values[len(kwargs)]).__name__}", msg_type=cls.__name__,
                            field_name=name) from None
    if len(values) >= len(plan) and not _HAS_POST_INIT.get(cls, True):
        # Every field present (the common case): fill the frozen instance directly, the
        # same object __init__ would build, without its per-field object.__setattr__.
        msg: Message = object.__new__(cls)
        msg.__dict__.update(kwargs)
        return msg
    for name, _, required in plan[len(values):]:
        if required:
            raise ProtocolError("missing required field (truncated message)", msg_type=cls.__name__,
                                field_name=name)
        # else: an older peer; the dataclass default is the wire default
    msg = typing.cast(Any, cls)(**kwargs)
    return msg


def leading_items(data: bytes, count: int) -> list[Any]:
    """The first ``count`` items of a frame's array (fewer where the frame has fewer, none where
    it is no array), read one by one: what a frame whose later bytes or fields are broken still
    shows, e.g. its type and first field, so a refusal can name the request it answers."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    out: list[Any] = []
    try:
        unpacker.feed(data)
        size = unpacker.read_array_header()
        for _ in range(min(size, count)):
            out.append(unpacker.unpack())
    except Exception:  # msgpack raises several unrelated exception types: what was read is the answer
        pass
    return out


#: Per message class, (name, to-wire function) per wire field: encode's loop, built on first use.
_ENCODERS: dict[type[Message], tuple[tuple[str, Any], ...]] = {}
#: Per message class, (name, check, required) per wire field: decode's loop, built on first use.
_DECODERS: dict[type[Message], tuple[tuple[str, Any, bool], ...]] = {}
#: Whether a message class needs its __init__ run (a __post_init__ to honour); filled at
#: registration. A class not in it (never the case for a registered one) takes __init__.
_HAS_POST_INIT: dict[type[Message], bool] = {}


__all__ = ["Message", "ProtocolError", "decode", "encode", "field_names", "leading_items", "message_types"]
