"""Message declarations: kinds come from annotations, mistakes fail when the class is created,
and peer messages are stamped with src and token once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvd import wire as w
from kvd.wire import Message, wire


def test_kinds_follow_the_annotations() -> None:
    kinds = {f.name: f.kind for f in w.TransferRequest.FIELDS}
    assert kinds["room"] == "int" and kinds["deadline_s"] == "float" and kinds["dummy"] == "bool"
    assert kinds["pool_key"] == "str" and kinds["dst_indices"] == "indices"
    assert {f.name: f.kind for f in w.EngineInfo.FIELDS}["layouts"] == "maps"
    assert {f.name: f.kind for f in w.EngineInfo.FIELDS}["daemons"] == "strs"
    assert {f.name: f.kind for f in w.PoolAnnounce.FIELDS}["buffers"] == "ints"
    assert {f.name: f.kind for f in w.RegisterPool.FIELDS}["layout"] == "map"
    assert {f.name: f.kind for f in w.SendChunk.FIELDS}["aux"] == "bytes"


def test_registry_holds_every_exported_message() -> None:
    exported: set[type[Message]] = {*w.ENGINE_REQUESTS, *w.ENGINE_REPLIES, *w.PEER_MESSAGES}
    assert set(w.message_types().values()) >= exported
    assert {cls.TYPE for cls in exported} == {c.TYPE for c in w.message_types().values() if c in exported}


def test_peer_src_and_token_default_in_python_but_are_required_on_the_wire() -> None:
    msg = w.Heartbeat(nonce=3)
    assert (msg.src, msg.token) == ("", "")
    by_name = {f.name: f for f in w.Heartbeat.FIELDS}
    assert by_name["src"].required and by_name["token"].required and by_name["nonce"].required


def test_stamped_sets_src_and_token_and_keeps_the_rest() -> None:
    msg = w.TransferRequest(room=7, transfer_id=1, pool_key="k", prefill_engine_id="P", sender_rank=0,
                            dst_indices=np.array([1, 2]), dummy=False, deadline_s=1.0, chunk_tokens=8)
    out = w.stamped(msg, "tcp://a:1", "tok")
    assert type(out) is w.TransferRequest and (out.src, out.token) == ("tcp://a:1", "tok")
    assert out.chunk_tokens == 8 and out.dst_indices is msg.dst_indices and msg.src == ""
    back = w.decode(out.encode())
    assert isinstance(back, w.TransferRequest) and (back.src, back.token) == ("tcp://a:1", "tok")


def test_messages_are_frozen_and_keyword_only() -> None:
    msg = w.Ok(req_id=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.req_id = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        w.Ok(1)  # type: ignore[call-arg]


def test_wire_refuses_a_version_past_protocol_version() -> None:
    with pytest.raises(ValueError, match="PROTOCOL_VERSION"):
        wire(0, since=w.PROTOCOL_VERSION + 1)
    with pytest.raises(ValueError):
        wire(0, since=0)
    with pytest.raises(ValueError):
        wire("", since=2, required_on_wire=True)
    with pytest.raises(ValueError):
        w.Field("x", "int", since=w.PROTOCOL_VERSION + 1, default=0)


def test_unknown_annotation_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="Bad.x"):
        @dataclass(frozen=True, eq=False, kw_only=True)
        class Bad(Message):
            TYPE = 250
            x: set[int]


def test_a_later_field_before_an_earlier_one_is_refused() -> None:
    with pytest.raises(ValueError, match="only appended"):
        @dataclass(frozen=True, eq=False, kw_only=True)
        class Bad(Message):
            TYPE = 250
            a: int = wire(0, since=2)
            b: int = 0


def test_a_type_number_is_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        @dataclass(frozen=True, eq=False, kw_only=True)
        class Bad(Message):
            TYPE = w.Ok.TYPE
            req_id: int
    assert w.message_types()[w.Ok.TYPE] is w.Ok


def test_default_factory_is_refused() -> None:
    with pytest.raises(ValueError, match="default_factory"):
        @dataclass(frozen=True, eq=False, kw_only=True)
        class Bad(Message):
            TYPE = 250
            xs: list[int] = dataclasses.field(default_factory=list)


def test_the_base_peer_message_cannot_be_encoded() -> None:
    with pytest.raises(TypeError):
        w.encode(w.PeerMessage())


def test_compat_module_keeps_its_names() -> None:
    from kvd import protocol as p
    from kvd.wire import protocol
    assert p is protocol
    for name in protocol.__all__ + ["MAX_FRAME_BYTES"]:
        assert getattr(protocol, name) is getattr(w, name)


def test_importing_the_wire_package_loads_no_asyncio_zmq_or_torch() -> None:
    code = ("import sys, kvd.wire, kvd.wire.protocol, kvd.protocol; "
            "print(','.join(m for m in ('asyncio', 'zmq', 'torch') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"kvd.wire imported {out.stdout.strip()}"


def test_a_type_alias_statement_is_unwrapped() -> None:
    """Python 3.12 makes numpy's NDArray a `type` alias (TypeAliasType): its subscription's
    origin carries the aliased type in ``__value__``; the GPU host runs 3.12."""
    import numpy as np

    from kvd.wire.fields import kind_of

    class FakeAlias:  # what typing.TypeAliasType looks like to kind_of
        __value__ = np.ndarray

    class Subscripted:
        __origin__ = FakeAlias()
        __args__ = (np.int64,)

    assert kind_of(FakeAlias()) == "indices"
    import typing
    assert typing.get_origin(Subscripted()) is None or kind_of(Subscripted()) == "indices"
