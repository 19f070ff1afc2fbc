"""Field kinds of the wire protocol: what a message field may hold and how it is checked and encoded.

A message field's wire kind follows from its Python annotation (``int``, ``float``, ``bool``,
``str``, ``bytes``, ``Map``, ``list[int]``, ``list[str]``, ``list[Map]``, ``Indices``);
``wire(default, since=N)`` is the field specifier that records when a field was appended.

This module knows nothing of message types, sockets or framing; it never imports asyncio, zmq
or torch.

Versions. ``since`` counts schema revisions: a field with ``since=N`` was appended in revision
N, and an older peer simply does not send it. ``PROTOCOL_VERSION`` is the newest revision any
field names: 2, for the fields appended after the first release (the staging fields,
``TransferRequest.enable_hisparse``, ``EngineInfo.conflict``). A field may not name a later
revision (checked when its class is created), and a test keeps PROTOCOL_VERSION equal to the
highest ``since``. The version byte in
each frame's header is ``HEADER_VERSION``, not ``PROTOCOL_VERSION``: appended fields need no
version number to be understood (decoders fill defaults for missing trailing fields and skip
unknown ones), so that byte stays 1, as every release so far has written it, and would change
only with an incompatible wire format, which the append-only rules exist to avoid.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

PROTOCOL_VERSION = 7
HEADER_VERSION = 1

Map: TypeAlias = dict[str, Any]
"""A msgpack map; nested values are whatever msgpack carries."""

Indices: TypeAlias = npt.NDArray[np.int64]
"""An index array (pages or tokens); on the wire, little-endian int64 bytes, 8 bytes per index."""


class _Required:
    """The wire default of a field every frame must carry."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""``Field.default`` of a field that a frame must carry: its absence is a ProtocolError."""


# --- checkers (wire value -> Python value, or raise TypeError) and encoders ---------------------


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("expected a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("expected a boolean")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes | bytearray):
        raise TypeError("expected bytes")
    return bytes(v)


def _map(v: Any) -> Map:
    if not isinstance(v, dict):
        raise TypeError("expected a map")
    return v


def _int_list(v: Any) -> list[int]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of integers")
    return [_int(x) for x in v]


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of strings")
    return [_str(x) for x in v]


def _map_list(v: Any) -> list[Map]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of maps")
    return [_map(x) for x in v]


def _indices(v: Any) -> Indices:
    # 8 bytes per index and no per-item tags: a 100k-page room stays one memcpy.
    if not isinstance(v, bytes | bytearray) or len(v) % 8:
        raise TypeError("expected an index array (little-endian int64 bytes)")
    return np.frombuffer(v, dtype="<i8").astype(np.int64)  # astype copies: the array owns its memory


def _encode_indices(v: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(v, dtype="<i8")).tobytes()


def _float_out(v: Any) -> float:
    return _float(float(v))


def _list_out(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: check(list(v))


@dataclass(frozen=True)
class Kind:
    """A wire kind: ``check`` turns a decoded wire value into the Python value (TypeError if it
    is not one), ``encode`` turns a Python value into the wire value (TypeError/ValueError)."""

    name: str
    check: Callable[[Any], Any]
    encode: Callable[[Any], Any]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("int", _int, _int),
    Kind("float", _float, _float_out),
    Kind("bool", _bool, _bool),
    Kind("str", _str, _str),
    Kind("bytes", _bytes, _bytes),
    Kind("map", _map, _map),
    Kind("ints", _int_list, _list_out(_int_list)),
    Kind("strs", _str_list, _list_out(_str_list)),
    Kind("maps", _map_list, _list_out(_map_list)),
    Kind("indices", _indices, _encode_indices),
)}

_SCALARS: dict[type, str] = {int: "int", float: "float", bool: "bool", str: "str", bytes: "bytes"}
_LISTS = {"int": "ints", "str": "strs", "map": "maps"}


def kind_of(annotation: Any) -> str:
    """The wire kind a (resolved) annotation stands for; TypeError if it has none."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation is dict or origin is dict:
        return "map"
    if origin is list:
        args = typing.get_args(annotation)
        inner = kind_of(args[0]) if len(args) == 1 else None
        if inner in _LISTS:
            return _LISTS[inner]
    if annotation is np.ndarray or origin is np.ndarray:
        return "indices"
    # A `type X = ...` alias (numpy's NDArray is one on Python 3.12+): the kind of what it names.
    alias = getattr(origin, "__value__", None) or getattr(annotation, "__value__", None)
    if alias is not None:
        return kind_of(alias)
    raise TypeError(f"{annotation!r} has no wire kind (int, float, bool, str, bytes, Map, "
                    "list[int], list[str], list[Map], Indices)")


# --- declared fields --------------------------------------------------------------------------


def _check_since(name: str, since: int, has_default: bool) -> None:
    if isinstance(since, bool) or not isinstance(since, int) or not 1 <= since <= PROTOCOL_VERSION:
        raise ValueError(f"{name}: since={since!r} is not a protocol version in 1..{PROTOCOL_VERSION} "
                         "(raise PROTOCOL_VERSION when appending a field)")
    if since > 1 and not has_default:
        raise ValueError(f"{name}: a field added in version {since} needs a default "
                         "(an older peer does not send it)")


@dataclass(frozen=True)
class Field:
    """One field as the wire sees it: name, kind, wire default (REQUIRED: every frame carries it)
    and the protocol version that appended it."""

    name: str
    kind: str
    default: Any = REQUIRED
    since: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown field kind {self.kind!r}")
        if isinstance(self.default, list | dict | set | bytearray | np.ndarray):
            raise ValueError(f"field {self.name}: mutable defaults are not allowed in messages")
        _check_since(f"field {self.name}", self.since, self.default is not REQUIRED)

    @property
    def required(self) -> bool:
        """Every frame must carry this field (a frame without it is a ProtocolError)."""
        return self.default is REQUIRED


_META = "kvd.wire"


@dataclass(frozen=True)
class _Spec:
    since: int
    required_on_wire: bool


T = TypeVar("T")


def wire(default: T, *, since: int = 1, required_on_wire: bool = False) -> T:
    """Field specifier: ``flag: bool = wire(False, since=2)``.

    ``since``: the protocol version that appended the field (> 1 needs the default, which an
    older peer's frame gets). ``required_on_wire``: the default is for Python callers only
    (a peer message's ``src``, stamped by the hub); a frame without the field is still refused.
    """
    if required_on_wire and since > 1:
        raise ValueError("a field appended after version 1 cannot be required on the wire")
    _check_since("wire()", since, True)
    spec = _Spec(since=since, required_on_wire=required_on_wire)
    out: T = dataclasses.field(default=default, metadata={_META: spec})
    return out


def declared_field(owner: str, name: str, annotation: Any, value: Any) -> Field:
    """The wire Field for one annotated class attribute (``value``: its class-body value, or
    dataclasses.MISSING). Raises TypeError/ValueError naming ``owner.name``."""
    spec = _Spec(since=1, required_on_wire=False)
    default: Any = value
    if isinstance(value, dataclasses.Field):
        found = value.metadata.get(_META)
        if isinstance(found, _Spec):
            spec = found
        if value.default_factory is not dataclasses.MISSING:
            raise ValueError(f"{owner}.{name}: default_factory is not allowed in messages")
        default = value.default
    if default is dataclasses.MISSING or spec.required_on_wire:
        default = REQUIRED
    try:
        return Field(name, kind_of(annotation), default, spec.since)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{owner}.{name}: {exc}") from None


def is_classvar(annotation: Any) -> bool:
    return annotation is ClassVar or typing.get_origin(annotation) is ClassVar


__all__ = ["HEADER_VERSION", "KINDS", "PROTOCOL_VERSION", "REQUIRED", "Field", "Indices", "Kind", "Map",
           "declared_field", "is_classvar", "kind_of", "wire"]
