"""Wire protocol: byte-level round trips, older and newer peers, and clear errors."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvd import protocol as p


def _request(**kw) -> p.TransferRequest:
    base = dict(src="tcp://a:1", token="t", room=7, transfer_id=99, pool_key="k", prefill_engine_id="P",
                sender_rank=2, dst_indices=np.array([3, 4, 9]), dummy=False, deadline_s=5.0)
    base.update(kw)
    return p.TransferRequest(**base)


def test_header_is_version_then_type_then_fields_in_order():
    raw = msgpack.unpackb(_request().encode())
    assert raw[0] == p.PROTOCOL_VERSION and raw[1] == p.TransferRequest.TYPE
    assert raw[2:4] == ["tcp://a:1", "t"]
    assert len(raw) == 2 + len(p.TransferRequest.FIELDS)


def test_round_trip_every_message_type():
    samples = {
        p.RegisterPool: dict(req_id=1, layout={"a": 1}, memory={"kind": "shm"}),
        p.SendChunk: dict(req_id=2, pool_id=1, room=3, pages=np.arange(4), is_last=True, aux=b"x"),
        p.RoomEvent: dict(req_id=0, room=3, state="success", aux=b"\x00\x01"),
        p.EngineInfo: dict(src="s", token="", engine_id="e", ready=True, tp_size=1, layouts=[{}],
                           daemons=["d"]),
    }
    for cls, kw in samples.items():
        msg = p.decode(cls(**kw).encode())
        assert type(msg) is cls
        for name in p.field_names(cls):
            a, b = getattr(msg, name), getattr(cls(**kw), name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_older_peer_without_appended_field_gets_defaults():
    """A version-1 peer does not send enable_hisparse (added later): it parses as False."""
    raw = msgpack.unpackb(_request(enable_hisparse=True).encode())
    older = msgpack.packb(raw[:-1], use_bin_type=True)
    msg = p.decode(older)
    assert isinstance(msg, p.TransferRequest) and msg.enable_hisparse is False
    assert msg.room == 7 and list(msg.dst_indices) == [3, 4, 9]


def test_newer_peer_with_extra_trailing_fields_is_understood():
    raw = msgpack.unpackb(_request(enable_hisparse=True).encode())
    newer = msgpack.packb(raw + [123, "future", {"staging": 1}], use_bin_type=True)
    msg = p.decode(newer)
    assert msg.enable_hisparse is True and msg.sender_rank == 2


def test_newer_version_number_still_decodes_known_fields():
    raw = msgpack.unpackb(p.Heartbeat(src="x", token="", nonce=5).encode())
    raw[0] = p.PROTOCOL_VERSION + 3
    assert p.decode(msgpack.packb(raw)).nonce == 5


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.__setitem__(4, "seven"), "room"),
    (lambda r: r.__setitem__(9, [1, 2, 3]), "dst_indices"),
    (lambda r: r.__setitem__(10, 1), "dummy"),
])
def test_wrong_type_names_the_field(mutate, field):
    raw = msgpack.unpackb(_request().encode())
    mutate(raw)
    with pytest.raises(p.ProtocolError) as err:
        p.decode(msgpack.packb(raw, use_bin_type=True))
    assert err.value.field_name == field and "TransferRequest" in str(err.value)


def test_truncated_message_names_the_missing_field():
    raw = msgpack.unpackb(_request().encode())
    with pytest.raises(p.ProtocolError, match="room"):
        p.decode(msgpack.packb(raw[:4], use_bin_type=True))


@pytest.mark.parametrize("data", [b"", b"\xc1garbage", b"\x93\x01", msgpack.packb({"a": 1}),
                                  msgpack.packb([1, 999, "x"]), msgpack.packb(["1", 32]),
                                  _request().encode()[:-3]])
def test_garbage_raises_one_protocol_error(data):
    with pytest.raises(p.ProtocolError):
        p.decode(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    with contextlib.suppress(p.ProtocolError):
        p.decode(data)


def test_fields_added_later_must_have_defaults():
    with pytest.raises(ValueError):
        p.Field("x", "int", since=2)


def test_frame_buffer_splits_stream_into_payloads():
    a, b = p.Ok(req_id=1).encode(), p.Ok(req_id=2).encode()
    stream = p.frame(a) + p.frame(b)
    fb = p.FrameBuffer()
    out = []
    for i in range(len(stream)):  # one byte at a time
        fb.feed(stream[i:i + 1])
        while (x := fb.next_payload()) is not None:
            out.append(x)
    assert out == [a, b]


def test_oversized_frame_is_refused():
    fb = p.FrameBuffer(max_frame=10)
    fb.feed(p.frame(b"x" * 11))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        fb.next_payload()
