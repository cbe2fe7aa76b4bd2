"""A frame nested 50,000 deep sent by a member over a real ZMQ socket to a
running BufferService: refused like any undecodable frame (``Ack`` rejected, reason ``decode: ...
nested too deeply``, counted in ``buffer/rejected{reason="decode"}``), and the buffer keeps serving:
the same socket's next request and another client's are answered, and a group is still accepted."""

from __future__ import annotations

import zmq
from test_buffer_service import make_cfg, make_group, register, running

from areal_like.wire import protocol as P

REPLY_S = 10.0  # a live buffer answers in milliseconds; a dead one never does


def nested(depth: int) -> bytes:
    """``{"type": "stats", "values": {"a": [[[...]]]}, "protocol": <this side's>}``, the list
    ``depth`` deep, written by hand: every msgpack encoder recurses too."""
    return (b"\x83\xa4type\xa5stats\xa6values\x81\xa1a" + b"\x91" * depth + b"\x90\xa8protocol"
            + bytes([P.PROTOCOL_VERSION]))


def test_a_deeply_nested_frame_is_refused_and_the_buffer_keeps_serving(tmp_path):
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, c):
        register(c)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(cfg.buffer.address)
        replies = []
        try:
            for i, payload in enumerate([nested(50_000), P.encode(P.StatsRequest())]):
                sock.send_multipart([bytes([i]), payload])
                assert sock.poll(int(REPLY_S * 1000)), f"no reply to frame {i}: the buffer died"
                req_id, reply = sock.recv_multipart()
                assert req_id == bytes([i])
                replies.append(P.decode(reply))
        finally:
            sock.close(linger=0)
        ack, stats = replies
        assert ack.status == "rejected" and ack.reason.startswith("decode"), ack.reason
        assert "nested too deeply" in ack.reason, ack.reason
        assert isinstance(stats, P.Stats) and stats.values["rejected_decode"] == 1
        credit = c.request(P.CreditRequest(server_id="s0", max_credits=1)).credits[0]
        assert c.request(make_group(credit)).status == "accepted"
