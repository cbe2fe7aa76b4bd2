"""Sealed bulk frames byte by byte (areal_like/sealed.py): the frame, nonce and AAD layout checked by
hand against AESGCM itself, directions that never share a nonce, and what a channel refuses."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from areal_like import sealed

SID = bytes(range(16))
KEY = bytes(range(100, 132))
REQ = b"r" * 16


def test_frame_nonce_and_aad_layout_by_hand():
    client = sealed.Channel(SID, KEY, sealed.TO_SERVER)
    client.seal(REQ, b"first")
    frame = client.seal(REQ, b"hello")  # counter 2
    assert frame[:16] == SID
    assert frame[16:24] == struct.pack(">Q", 2) == b"\x00" * 7 + b"\x02"
    plain_nonce = b"\x01\x00\x00\x00" + b"\x00" * 7 + b"\x02"  # direction 0x01, 3 zero bytes, counter
    nonce = bytes(a ^ b for a, b in zip(plain_nonce, SID[:12]))  # masked by the session id's first 12 bytes
    assert sealed.nonce(sealed.nonce_mask(SID), sealed.TO_SERVER, 2) == nonce and len(nonce) == 12
    assert AESGCM(KEY).decrypt(nonce, frame[24:], SID + frame[16:24] + REQ) == b"hello"
    assert len(frame) == 16 + 8 + len(b"hello") + 16  # ciphertext the plaintext's length, then the tag
    server = sealed.Channel(SID, KEY, sealed.TO_CLIENT)
    reply = server.seal(REQ, b"ack")
    reply_nonce = bytes(a ^ b for a, b in zip(b"\x02\x00\x00\x00" + struct.pack(">Q", 1), SID[:12]))
    assert AESGCM(KEY).decrypt(reply_nonce, reply[24:], reply[:24] + REQ) == b"ack"


def test_directions_never_share_a_nonce_and_sessions_never_share_a_counter_block():
    mask = sealed.nonce_mask(SID)
    nonces = {sealed.nonce(mask, d, c) for d in (sealed.TO_SERVER, sealed.TO_CLIENT) for c in range(1, 1000)}
    assert len(nonces) == 2 * 999
    first = {sealed.nonce(sealed.nonce_mask(sealed.SessionTable().create("r", b"p").channel.sid), sealed.TO_SERVER, 1)
             for _ in range(100)}
    assert len(first) == 100  # every session's first frame runs through a counter block of its own


def test_a_writable_frame_is_opened_in_place_and_a_read_only_one_is_left_as_it_was():
    client, server = sealed.Channel(SID, KEY, sealed.TO_SERVER), sealed.Channel(SID, KEY, sealed.TO_CLIENT)
    frame = bytearray(client.seal(REQ, b"in place"))
    head, tag = bytes(frame[:24]), bytes(frame[-16:])
    plain = server.open(REQ, frame)
    assert plain == b"in place" and plain.readonly and bytes(frame[24:-16]) == b"in place"  # the frame's own bytes
    assert bytes(frame[:24]) == head and bytes(frame[-16:]) == tag
    sealed_bytes = client.seal(REQ, b"copied")
    kept = bytes(sealed_bytes)
    assert server.open(REQ, sealed_bytes) == b"copied" and sealed_bytes == kept


def test_channel_opens_in_order_and_refuses_replay_reflection_and_tampering():
    client, server = sealed.Channel(SID, KEY, sealed.TO_SERVER), sealed.Channel(SID, KEY, sealed.TO_CLIENT)
    first, second = client.seal(REQ, b"a"), client.seal(REQ, b"b")
    assert server.open(REQ, second) == b"b"
    with pytest.raises(sealed.SealError, match="replayed"):
        server.open(REQ, first)  # older than the last accepted
    with pytest.raises(sealed.SealError, match="replayed"):
        server.open(REQ, second)
    third = client.seal(REQ, b"c")
    with pytest.raises(sealed.SealError, match="bad tag"):
        server.open(b"x" * 16, third)  # another request's id: the AAD differs
    with pytest.raises(sealed.SealError, match="bad tag"):
        client.open(REQ, client.seal(REQ, b"d"))  # reflected back to its sender: the other direction's nonce
    tampered = bytearray(third)
    tampered[-20] ^= 1
    with pytest.raises(sealed.SealError, match="bad tag"):
        server.open(REQ, bytes(tampered))
    assert server.open(REQ, third) == b"c"  # refusals changed nothing
    wrong_key = sealed.Channel(SID, bytes(32), sealed.TO_SERVER, sent=10)
    with pytest.raises(sealed.SealError, match="bad tag"):
        server.open(REQ, wrong_key.seal(REQ, b"e"))
    with pytest.raises(sealed.SealError, match="unknown session"):
        server.open(REQ, sealed.Channel(bytes(16), KEY, sealed.TO_SERVER, sent=10).seal(REQ, b"f"))


def test_welcome_round_trip_and_keys_never_in_repr():
    table = sealed.SessionTable(max_sessions=2)
    session = table.create("rollout", b"peer-1")
    channel, port = sealed.client_channel(sealed.welcome(session, 4321))
    assert (channel.sid, channel.key, port) == (session.channel.sid, session.channel.key, 4321)
    assert len(channel.key) == 16  # AES-128 (SECURITY.md: why)
    with pytest.raises(sealed.SealError, match="another version of the session protocol"):
        sealed.client_channel(b"\x00areal-like/session/1" + bytes(16 + 32 + 2))  # a buffer of session/1
    assert session.channel.key.hex() not in repr(session) and repr(session.channel.key) not in repr(session)
    assert repr(channel.key) not in repr(channel)
    with pytest.raises(sealed.SealError, match="refused: no"):
        sealed.client_channel(sealed.REFUSED + b"no")
    table.create("rollout", b"peer-1")  # a new HELLO replaces the peer's session
    assert len(table) == 1 and table.for_peer(b"peer-1") is not session
    table.create("trainer", b"peer-2"), table.create("trainer", b"peer-3")
    assert len(table) == 2 and table.for_peer(b"peer-1") is None  # the oldest is forgotten


def test_the_session_table_forgets_the_least_recently_used_session_first():
    table = sealed.SessionTable(max_sessions=2)
    busy = table.create("trainer", b"t")
    table.create("rollout", b"r1")
    client = sealed.Channel(busy.channel.sid, busy.channel.key, sealed.TO_SERVER)
    assert table.open(b"route", REQ, client.seal(REQ, b"x"))[0] is busy  # used after idle was made
    table.create("rollout", b"r2")  # a third: the one not used since it was made goes
    assert table.for_peer(b"t") is busy and table.for_peer(b"r1") is None and len(table) == 2
    assert table.open(b"route", REQ, client.seal(REQ, b"y"))[1] == b"y"  # the busy session still opens frames


def test_a_channel_counts_the_bytes_its_key_carried_and_opens_nothing_past_twice_the_budget(monkeypatch):
    monkeypatch.setattr(sealed, "SESSION_BYTES", 10)
    client, server = sealed.Channel(SID, KEY, sealed.TO_SERVER), sealed.Channel(SID, KEY, sealed.TO_CLIENT)
    assert server.open(REQ, client.seal(REQ, b"12345678")) == b"12345678"  # 8 bytes each way so far
    assert client.open(REQ, server.seal(REQ, b"abcdefghijk")) == b"abcdefghijk"  # 8 + 11 = 19 < 20
    assert client.carried == server.carried == 19
    last = client.seal(REQ, b"z")  # sealing is never refused: the client shakes hands again first
    assert server.open(REQ, last) == b"z" and server.carried == 20
    with pytest.raises(sealed.SealError, match="key spent"):
        server.open(REQ, client.seal(REQ, b"late"))  # 2 x SESSION_BYTES carried: nothing more opens
    assert server.received == 2 and server.carried == 20  # the refused frame changed nothing


def test_a_retired_session_is_forgotten_by_id_and_by_peer():
    table = sealed.SessionTable()
    spent, other = table.create("rollout", b"r1"), table.create("rollout", b"r2")
    table.retire(spent)
    assert table.for_peer(b"r1") is None and table.for_peer(b"r2") is other and len(table) == 1
    client = sealed.Channel(spent.channel.sid, spent.channel.key, sealed.TO_SERVER)
    with pytest.raises(sealed.SealError, match="unknown session"):
        table.open(b"route", REQ, client.seal(REQ, b"x"))
