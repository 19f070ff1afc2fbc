"""Wire protocol: byte-level round trips, older and newer peers, and clear errors."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvd import protocol as p
from kvd.wire import HEADER_VERSION


def _request(**kw) -> p.TransferRequest:
    base = dict(src="tcp://a:1", token="t", room=7, transfer_id=99, pool_key="k", prefill_engine_id="P",
                sender_rank=2, dst_indices=np.array([3, 4, 9]), dummy=False, deadline_s=5.0)
    base.update(kw)
    return p.TransferRequest(**base)


def test_header_is_version_then_type_then_fields_in_order():
    raw = msgpack.unpackb(_request().encode())
    assert raw[0] == HEADER_VERSION == 1 and raw[1] == p.TransferRequest.TYPE
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


def _cut_before(msg: p.Message, field: str) -> bytes:
    """``msg`` as a peer from before ``field`` (and every later field) was added sends it."""
    raw = msgpack.unpackb(msg.encode())
    return msgpack.packb(raw[:2 + p.field_names(type(msg)).index(field)], use_bin_type=True)


def test_older_peer_without_appended_field_gets_defaults():
    """A version-1 peer does not send enable_hisparse (added later): it parses as False."""
    msg = p.decode(_cut_before(_request(enable_hisparse=True), "enable_hisparse"))
    assert isinstance(msg, p.TransferRequest) and msg.enable_hisparse is False
    assert msg.room == 7 and list(msg.dst_indices) == [3, 4, 9]


def test_peer_without_staging_fields_asks_for_the_per_slice_path():
    """Staging fields are appended: a peer that predates them asks for chunk_tokens 0 (per-slice),
    announces no staging pool, and acks without staging; nothing fails to parse."""
    req = p.decode(_cut_before(_request(chunk_tokens=64, writer=1, writers=4), "chunk_tokens"))
    assert (req.chunk_tokens, req.writer, req.writers) == (0, 0, 0)
    announce = p.PoolAnnounce(src="s", token="", pool_key="k", layout={}, buffers=[1, 2], session_id="x",
                              prefill_engine_id="P", staging_base=4096, staging_bytes=1 << 20)
    old = p.decode(_cut_before(announce, "staging_base"))
    assert (old.staging_base, old.staging_bytes) == (0, 0)
    ack = p.decode(_cut_before(p.PoolAck(src="s", token="", pool_key="k", ok=True, staging=True), "staging"))
    assert ack.staging is False and ack.ok is True


def test_staging_messages_round_trip_and_name_bad_fields():
    grant = p.StagingGrant(src="s", token="t", room=1, transfer_id=2, pool_key="k", sender_rank=3,
                           chunk=4, offset=1 << 33)
    back = p.decode(grant.encode())
    assert isinstance(back, p.StagingGrant) and (back.chunk, back.offset) == (4, 1 << 33)
    raw = msgpack.unpackb(p.ChunkWritten(src="s", token="t", room=1, transfer_id=2, pool_key="k",
                                         sender_rank=3, chunk=4, nbytes=5).encode())
    raw[2 + [f.name for f in p.ChunkWritten.FIELDS].index("nbytes")] = "five"
    with pytest.raises(p.ProtocolError, match="ChunkWritten.nbytes"):
        p.decode(msgpack.packb(raw))


def test_newer_peer_with_extra_trailing_fields_is_understood():
    raw = msgpack.unpackb(_request(enable_hisparse=True).encode())
    newer = msgpack.packb(raw + [123, "future", {"staging": 1}], use_bin_type=True)
    msg = p.decode(newer)
    assert msg.enable_hisparse is True and msg.sender_rank == 2


def test_newer_version_number_still_decodes_known_fields():
    raw = msgpack.unpackb(p.Heartbeat(src="x", token="", nonce=5).encode())
    raw[0] = max(p.PROTOCOL_VERSION, HEADER_VERSION) + 3
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
