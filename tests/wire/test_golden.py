"""Golden bytes: every message type's wire form is pinned, so a refactor cannot change the bytes.

``golden_v1.json`` holds, per message type, the bytes that the release before the typed
dataclasses (commit 32fba09, ``kvd/wire/protocol.py`` with the ``_message`` decorator) wrote for
the sample below. Never regenerate it from the current code: if a test here fails, the wire
changed, and peers of the older release would no longer understand this one.

A field appended since (``wire(default, since=N)``) needs no change here: today's frame must be
the golden frame followed by the appended fields at their defaults, and the golden frame (now
an older peer's) must decode with those defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest

from kvd.wire import protocol as p
from kvd.wire.fields import KINDS

_GOLDEN: dict[str, str] = json.loads((Path(__file__).with_name("golden_v1.json")).read_text())["messages"]

_MAP = {"kind": "shm", "name": "/kvd-0", "offsets": [0, 4096, 1 << 33], "nested": {"a": 1.5, "b": None}}
_PEER = {"src": "tcp://10.0.0.1:5555", "token": "s3cret"}

# One instance per message type, every field set to a value other than its default, so that a
# field dropped, reordered or re-typed shows in the bytes.
SAMPLES: dict[str, dict[str, Any]] = {
    # engine -> daemon requests
    "RegisterPool": dict(req_id=1, layout={"tp_rank": 0, "page_size": 16}, memory=_MAP,
                         bootstrap="tcp://10.0.0.2:5555"),
    "SendChunk": dict(req_id=2, pool_id=3, room=4, pages=np.array([5, 6, 7, 1 << 40], dtype=np.int64),
                      is_last=True, aux=b"\x00aux\xff", page_offset=12),
    "RecvRoom": dict(req_id=3, pool_id=3, room=4, bootstrap_addr="tcp://10.0.0.3:5555",
                     prefill_engine_id="P0", pages=np.array([9, 8, 7], dtype=np.int64), timeout_s=12.5,
                     enable_hisparse=True),
    "PollRoom": dict(req_id=4, room=4),
    "AbortRoom": dict(req_id=5, pool_id=3, room=4),
    "StatusRequest": dict(req_id=6),
    # daemon -> engine replies and events
    "PoolRegistered": dict(req_id=1, pool_id=3),
    "StatusReply": dict(req_id=6, status={"rooms": [{"room": 4, "state": "transferring"}], "uptime_s": 3.25}),
    "Ok": dict(req_id=7),
    "ErrorReply": dict(req_id=8, kind="bad_request", message="no such pool", room=4),
    "RoomEvent": dict(req_id=0, room=4, state="success", reason="done", aux=b"\x01\x02",
                      bytes_done=1 << 34, bytes_total=1 << 35, released=True),
    # daemon <-> daemon
    "Heartbeat": dict(**_PEER, nonce=11),
    "HeartbeatAck": dict(**_PEER, nonce=11),
    "RankAnnounce": dict(**_PEER, layout={"engine_id": "P0", "tp_rank": 1}),
    "EngineQuery": dict(**_PEER, engine_id="P0"),
    "EngineInfo": dict(**_PEER, engine_id="P0", ready=True, tp_size=2, layouts=[{"tp_rank": 0}, {"tp_rank": 1}],
                       daemons=["tcp://a:1", "tcp://b:2"], error="late rank"),
    "PoolAnnounce": dict(**_PEER, pool_key="D0/0", layout={"page_size": 16}, buffers=[1 << 40, 4096],
                         session_id="10.0.0.4:17000", prefill_engine_id="P0", staging_base=1 << 36,
                         staging_bytes=1 << 30),
    "PoolAck": dict(**_PEER, pool_key="D0/0", ok=False, error="layout mismatch", staging=True),
    "TransferRequest": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", prefill_engine_id="P0",
                            sender_rank=1, dst_indices=np.array([3, 4, 9], dtype=np.int64), dummy=True,
                            deadline_s=5.5, enable_hisparse=True, chunk_tokens=64, writer=1, writers=4),
    "TransferStatus": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1, ok=False,
                           reason="peer gone", aux=b"\x07", bytes_written=1 << 33, final=False),
    "AbortTransfer": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1, reason="abort"),
    "AbortAck": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1),
    "StagingGrant": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1, chunk=2,
                         offset=1 << 33),
    "ChunkWritten": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1, chunk=2,
                         nbytes=1 << 21),
    # added after the typed protocol landed (pinned when added)
    "RoomOutcome": dict(**_PEER, room=4, transfer_id=99, pool_key="D0/0", sender_rank=1, ok=False,
                        reason="receiver timed out"),
}

# The fields appended after the first release (``since`` > 1), pinned here so that nobody
# re-labels a field without a test noticing.
LATER_FIELDS = {
    "PoolAnnounce": ["staging_base", "staging_bytes"],
    "PoolAck": ["staging"],
    "TransferRequest": ["enable_hisparse", "chunk_tokens", "writer", "writers"],
}

REPLIES = ("PoolRegistered", "StatusReply", "Ok", "ErrorReply", "RoomEvent")


def _cls(name: str) -> type[p.Message]:
    cls = getattr(p, name)
    assert isinstance(cls, type) and issubclass(cls, p.Message)
    return cls


def _sample(name: str) -> p.Message:
    return _cls(name)(**SAMPLES[name])


def _golden(name: str) -> bytes:
    return bytes.fromhex(_GOLDEN[name])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return type(a) is type(b) and a == b


def _items(data: bytes) -> list[Any]:
    items = msgpack.unpackb(data, raw=False)
    assert isinstance(items, list)
    return items


def _body(data: bytes) -> bytes:
    """The bytes after the msgpack array header: the header byte, the type, then each field."""
    header = msgpack.Packer().pack_array_header(len(_items(data)))
    assert data.startswith(header)
    return data[len(header):]


def _pinned(name: str) -> list[p.Field]:
    """The fields the golden frame carries (a prefix of today's fields)."""
    return list(_cls(name).FIELDS[:len(_items(_golden(name))) - 2])


def _appended(name: str) -> list[p.Field]:
    """The fields appended since the golden frame was written (each needs since > 1 and a default)."""
    return list(_cls(name).FIELDS[len(_pinned(name)):])


def test_samples_and_golden_cover_every_message_type() -> None:
    names = {c.__name__ for c in (*p.ENGINE_REQUESTS, *p.PEER_MESSAGES)} | set(REPLIES)
    assert set(SAMPLES) == names == set(_GOLDEN)
    every = {c.__name__ for c in vars(p).values() if isinstance(c, type) and issubclass(c, p.Message)
             and c is not p.Message}
    assert every == names


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_fields_keep_their_names_and_order(name: str) -> None:
    assert [f.name for f in _pinned(name)] == list(SAMPLES[name])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_fields_appended_since_the_golden_frame_are_later_ones_with_defaults(name: str) -> None:
    for f in _appended(name):
        assert f.since > 1 and not f.required, f.name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_is_byte_identical_to_the_golden_frame(name: str) -> None:
    """Byte for byte, up to the fields appended since (which follow, at their defaults)."""
    for new in (_sample(name).encode(), p.encode(_sample(name))):
        if not _appended(name):
            assert new == _golden(name)
        golden_body = _body(_golden(name))
        assert _body(new)[:len(golden_body)] == golden_body
        extra = [KINDS[f.kind].encode(f.default) for f in _appended(name)]
        assert _items(new)[2 + len(_pinned(name)):] == extra


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_bytes_decode_to_the_sample(name: str) -> None:
    """An older peer's frame (the golden one) decodes to the sample, appended fields at defaults."""
    msg = p.decode(_golden(name))
    assert type(msg) is _cls(name)
    for field, value in SAMPLES[name].items():
        assert _same(getattr(msg, field), value), field
    for f in _appended(name):
        assert _same(getattr(msg, f.name), f.default), f.name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_full_frame_decodes_to_what_init_builds(name: str) -> None:
    """decode fills a frame that carries every field straight into the instance (no __init__):
    the object is the one the constructor builds from the same values, and stays frozen."""
    cls = _cls(name)
    built = cls(**{f.name: SAMPLES[name].get(f.name, f.default) for f in cls.FIELDS})
    msg = p.decode(built.encode())
    assert type(msg) is cls and msg.__dict__.keys() == built.__dict__.keys()
    for field, value in built.__dict__.items():
        assert _same(getattr(msg, field), value), field
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.__setattr__(cls.FIELDS[0].name, None)
    assert msg.encode() == built.encode()


def test_later_fields_are_the_pinned_ones_and_agree_with_the_version() -> None:
    later = {name: [f.name for f in _pinned(name) if f.since > 1] for name in SAMPLES}
    assert {k: v for k, v in later.items() if v} == LATER_FIELDS
    for name in SAMPLES:
        for f in _cls(name).FIELDS:
            assert 1 <= f.since <= p.PROTOCOL_VERSION
    newest = max(f.since for name in SAMPLES for f in _cls(name).FIELDS)
    assert newest == p.PROTOCOL_VERSION, "PROTOCOL_VERSION is ahead of every field's since"


@pytest.mark.parametrize("name, field", [(n, f) for n, fs in LATER_FIELDS.items() for f in fs])
def test_older_release_without_a_later_field_decodes_with_defaults(name: str, field: str) -> None:
    """The bytes a peer from before ``field`` was added sends: the golden frame cut before it."""
    fields = _cls(name).FIELDS
    cut = p.field_names(_cls(name)).index(field)
    msg = p.decode(msgpack.packb(_items(_golden(name))[:2 + cut], use_bin_type=True))
    for i, f in enumerate(fields):
        want = SAMPLES[name][f.name] if i < cut else f.default
        assert _same(getattr(msg, f.name), want), f.name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_trailing_defaulted_fields_may_be_left_out(name: str) -> None:
    """Any run of trailing fields with defaults may be missing; the first required one may not."""
    fields = _cls(name).FIELDS
    raw = _items(_sample(name).encode())
    for cut in range(len(fields), -1, -1):
        data = msgpack.packb(raw[:2 + cut], use_bin_type=True)
        if cut < len(fields) and fields[cut].required:
            with pytest.raises(p.ProtocolError) as err:
                p.decode(data)
            assert err.value.field_name == fields[cut].name and err.value.msg_type == name
            break
        msg = p.decode(data)
        for f in fields[cut:]:
            assert _same(getattr(msg, f.name), f.default), f.name


@pytest.mark.parametrize("name", [c.__name__ for c in p.PEER_MESSAGES])
def test_peer_messages_need_src_and_token_on_the_wire(name: str) -> None:
    assert p.field_names(_cls(name))[:2] == ["src", "token"]
    raw = _items(_golden(name))
    for cut, missing in ((0, "src"), (1, "token")):
        with pytest.raises(p.ProtocolError) as err:
            p.decode(msgpack.packb(raw[:2 + cut], use_bin_type=True))
        assert err.value.field_name == missing


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_newer_peer_extra_trailing_fields_are_ignored(name: str) -> None:
    """A newer peer appends fields this release does not know, and may send a higher header byte."""
    raw = _items(_sample(name).encode())
    newer = msgpack.packb([raw[0] + 1, *raw[1:], 7, "future", {"x": [1]}, b"\x00"], use_bin_type=True)
    msg = p.decode(newer)
    assert type(msg) is _cls(name)
    for field, value in SAMPLES[name].items():
        assert _same(getattr(msg, field), value), field


def test_dataclass_fields_are_the_wire_fields_in_order() -> None:
    for name in SAMPLES:
        cls = _cls(name)
        assert [f.name for f in dataclasses.fields(cast(Any, cls))] == p.field_names(cls)
