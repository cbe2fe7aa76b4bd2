"""Trajectory-group transport: our protocol + transport vs raw ZMQ bytes, between two processes.

A group is 8 trajectories of 256 prompt tokens and T output tokens (ids, logprobs, versions);
T in --tokens, default 512 and 4096. A receiving process serves both paths from one poll loop:
our ``Server`` (``recv`` decodes and validates the group, ``send`` answers an ``Ack``) and a raw
ROUTER that answers a prebuilt reply of the same size without decoding anything.

* **stream** (the goal's figure): the sender keeps ``WINDOW`` requests in flight (``--window``, 8;
  the goals are set at 8, other windows print ``goal`` null) on a DEALER
  configured like ``dealer.Client``'s, sending each group the way ``Client.request`` does
  (``FrameWriter``: encoded, ``[req_id, frame]`` framing) and decoding each Ack; the raw twin
  sends prebuilt bytes of the same size (without a copy, above pyzmq's threshold) and reads
  replies undecoded. Sender encode and receiver decode overlap, as they do when
  several rollout servers feed one buffer: this is the throughput the protocol allows.
* **stream, built** (``transport_stream_8xT_built``, for reference): the stream pattern with each
  group built from its arrays right before it is sent (``Trajectory.of(...)`` x 8 and the group),
  as a rollout server does. A Trajectory checks itself and takes its wire form when it is built,
  so part of what encoding once cost is paid here; this line keeps that cost in view.
* **stream, CURVE** (``transport_stream_8xT_curve``: the cost of security): the stream pattern of
  ours on a third endpoint of the receiver, a ``Server`` made with the job's CURVE keys active
  (``areal_like/net/security.py``: encrypted, client key checked by the ZAP handler at connect),
  from a DEALER holding a client key. ``figure`` is its groups/s, ``baseline`` the unencrypted
  stream of ours in the same rounds, ``ratio`` CURVE over unencrypted (goal >= 0.75 at T = 4096:
  CURVE costs at most a quarter of the throughput); ``ratio_to_raw`` and
  ``unencrypted_ratio_to_raw`` put both beside raw ZMQ. ``busiest_thread_cpu_us`` and
  ``thread_bound_ratio`` show where it goes: libzmq runs the cipher in the one I/O thread of a
  connection, beside the TCP copies.
* **stream, same node** (``transport_stream_8xT_local``): the stream of ours into the same CURVE
  socket through the ``ipc://`` endpoint it also binds (as the buffer does for a one-node run: no
  CURVE there, peers of this user only; ``areal_like/net/security.py``), from a DEALER holding the
  client key as a same-node rollout server does. ``baseline`` is the unencrypted tcp stream,
  ``ratio_to_curve`` the gain over CURVE.
* **reqrep** (for reference): ``Client.request`` with one request in flight, as a single
  rollout server's sender does; encode, decode and both wake-ups add up serially, so on a busy
  2-core box this ratio is much lower than the streaming one.

Both processes create sockets through ``transport`` (the sender its DEALERs, the receiver our
``Server``), so per-process settings apply to the raw path as much as to ours. Modes are interleaved
round by round so machine load hits both alike; figures are medians over rounds. One JSON line
per (pattern, T) and one for the built stream per T: ``figure`` (our groups/s), ``baseline`` (raw
groups/s), ``ratio`` (goal >= 0.8 for stream at T = 4096), MB/s for both, and the in-process
encode/decode (and build) cost of one group.

Every line carries a ``warning`` when the machine is loaded (1-minute load above the CPU count).

Run: ``python benchmarks/bench_transport.py [--tokens 512,4096] [--rounds 7] [--seconds 0.35]
[--window 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
from areal_like.daemon import MALLOC_ENV  # noqa: E402

if any(k not in os.environ for k in MALLOC_ENV):  # what every daemon starts with (launch/job.py)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})

import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from areal_like.net import security  # noqa: E402
from areal_like.net.dealer import Client  # noqa: E402
from areal_like.net.distributed import free_port  # noqa: E402
from areal_like.net.transport import FrameWriter, local_addresses, new_socket  # noqa: E402
from areal_like.wire import protocol as P  # noqa: E402
from areal_like.wire.trajectory import Trajectory  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transport_report import (  # noqa: E402
    GROUP_SIZE,
    at_least,
    at_least_each,
    child_cpu_s,
    cpu_split_s,
    number_in,
    summary_lines,
    thread_cpu_s,
)

PROMPT_TOKENS = 256
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
ZERO_COPY_BYTES = 64 * 1024  # pyzmq's own threshold for zero-copy frames
GOAL_WINDOW = 8  # the goals are set at this many requests in flight (a few rollout servers' worth)
WINDOW = GOAL_WINDOW  # requests in flight in the stream pattern (--window)

# The receiving process: our Server on argv[1], a raw ROUTER on argv[2], our Server with CURVE (keys
# in argv[4]) on argv[3] and, like the buffer's, on the same-node endpoint argv[5]; one poll loop.
RECEIVER = """
import sys, zmq
from areal_like.wire import protocol as P
from areal_like.net import security
from areal_like.net.transport import Server

server = Server(sys.argv[1])
curve = Server(sys.argv[3], keys=security.load(sys.argv[4], security.SERVER),
               local_address=sys.argv[5])
raw = zmq.Context.instance().socket(zmq.ROUTER)
raw.setsockopt(zmq.LINGER, 0)
raw.bind(sys.argv[2])
raw_ack = P.encode(P.Ack(ref="x" * 16, status="accepted", reason="4096"))
poller = zmq.Poller()
poller.register(server._sock, zmq.POLLIN)
poller.register(curve._sock, zmq.POLLIN)
poller.register(raw, zmq.POLLIN)
ours = {server._sock: server, curve._sock: curve}
print("READY", flush=True)
while True:
    for sock, _ in poller.poll(1000):
        if sock is raw:
            peer, req_id, payload = raw.recv_multipart(copy=False)
            raw.send_multipart([peer, req_id, raw_ack])
        else:
            if (got := ours[sock].recv(0)) is None:
                continue
            peer, req_id, msg = got
            if isinstance(msg, P.TrajectoryGroup):
                reply = P.Ack(ref=msg.group_id, status="accepted", reason=str(msg.n_tokens))
            else:
                reply = P.Ack(ref="", status="rejected", reason=str(msg))
            ours[sock].send(peer, req_id, reply)
"""


def make_group(tokens: int, seed: int) -> P.TrajectoryGroup:
    rng = np.random.default_rng(seed)
    trajs = [Trajectory.of(prompt_ids=rng.integers(0, 32000, PROMPT_TOKENS, dtype=np.int32),
                          output_ids=rng.integers(0, 32000, tokens, dtype=np.int32),
                          behav_logp=-rng.random(tokens, dtype=np.float32),
                          versions=np.full(tokens, 3, dtype=np.int32), reward=float(i % 2),
                          finish_reason="length",
                          metadata={"answer": "42", "lens": [PROMPT_TOKENS, tokens]})
             for i in range(GROUP_SIZE)]
    return P.TrajectoryGroup(group_id=f"bench-{seed:016d}", server_id="bench", lease_id=str(seed),
                             prompt_index=seed,
                             epoch=0, trajectories=trajs)


def round_reqrep_ours(client: Client, groups: list[P.TrajectoryGroup], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    expected = str(groups[0].n_tokens)
    while (elapsed := time.perf_counter() - t0) < seconds:
        ack = client.request(groups[n % len(groups)])
        if ack.status != "accepted" or ack.reason != expected:
            raise RuntimeError(f"receiver rejected the group: {ack}")
        n += 1
    return n / elapsed


def round_reqrep_raw(sock: zmq.Socket, payload: bytes, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        req_id = n.to_bytes(16, "little")
        sock.send_multipart([req_id, payload], copy=len(payload) < ZERO_COPY_BYTES)
        if not sock.poll(int(REQUEST_TIMEOUT_S * 1000)):
            raise RuntimeError("raw receiver did not answer")
        rid, _ack = sock.recv_multipart(copy=False)
        assert rid.bytes == req_id
        n += 1
    return n / elapsed


def send_raw(payload: bytes):
    def send(sock: zmq.Socket, req_id: bytes, _i: int) -> None:
        sock.send_multipart([req_id, payload], copy=len(payload) < ZERO_COPY_BYTES)

    return send


def send_ours(groups: list[P.TrajectoryGroup]):
    writer = FrameWriter()  # what Client.request sends with

    def send(sock: zmq.Socket, req_id: bytes, i: int) -> None:
        writer.send(sock, [req_id], groups[i % len(groups)])

    return send


def send_built(groups: list[P.TrajectoryGroup]):
    """Like ``send_ours``, building each group from its own copies of the arrays just before it is
    sent."""
    writer = FrameWriter()
    parts = [(g, trajectory_parts(g)) for g in groups]

    def send(sock: zmq.Socket, req_id: bytes, i: int) -> None:
        writer.send(sock, [req_id], build_group(*parts[i % len(parts)]))

    return send


def trajectory_parts(group: P.TrajectoryGroup) -> list[dict]:
    """What a producer builds each of the group's trajectories from: fresh arrays and scalars."""
    return [dict(prompt_ids=t.prompt_ids.copy(), output_ids=t.output_ids.copy(),
                 behav_logp=t.behav_logp.copy(), versions=t.versions.copy(), reward=t.reward,
                 finish_reason=t.finish_reason, metadata=t.metadata)
            for t in group.trajectories]


def build_group(like: P.TrajectoryGroup, trajectories: list[dict]) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id=like.group_id, server_id=like.server_id,
                             lease_id=like.lease_id,
                             prompt_index=like.prompt_index, epoch=like.epoch,
                             trajectories=[Trajectory.of(**t) for t in trajectories])


def round_stream(sock: zmq.Socket, send, check_reply, seconds: float) -> float:
    """Keep WINDOW requests in flight; count replies per second."""
    sent = done = 0
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        while sent - done < WINDOW and elapsed < seconds:
            send(sock, sent.to_bytes(8, "little"), sent)
            sent += 1
        if done == sent:
            return done / elapsed
        if not sock.poll(int(REQUEST_TIMEOUT_S * 1000)):
            raise RuntimeError("receiver did not answer")
        rid, reply = sock.recv_multipart(copy=False)
        check_reply(rid.bytes, reply.buffer)
        done += 1


def dealer(address: str, keys: security.Keys | None = None) -> zmq.Socket:
    sock = new_socket(zmq.Context.instance(), zmq.DEALER, keys)  # Client's options (HWM, LINGER 0)
    security.connect(sock, address)  # as Client does: CURVE on tcp:// with keys, none on ipc://
    return sock


def codec_cost_us(group: P.TrajectoryGroup, repeats: int = 200) -> tuple[float, float]:
    """CPU microseconds to encode (into a kept buffer, as FrameWriter does) / decode one group in
    this process (robust to machine load)."""
    frame, buffer = P.encode(group), bytearray()
    t0 = time.process_time()
    for _ in range(repeats):
        P.encode_into(group, buffer)
    t1 = time.process_time()
    for _ in range(repeats):
        P.decode(frame)
    return 1e6 * (t1 - t0) / repeats, 1e6 * (time.process_time() - t1) / repeats


def build_cost_us(group: P.TrajectoryGroup, repeats: int = 200) -> float:
    """CPU microseconds to build one group from its arrays in this process."""
    parts = trajectory_parts(group)
    t0 = time.process_time()
    for _ in range(repeats):
        build_group(group, parts)
    return 1e6 * (time.process_time() - t0) / repeats


def bench_size(tokens: int, ours_addr: str, raw_addr: str, curve_addr: str, local_addr: str,
               keys: security.Keys, receiver_pid: int, rounds: int, seconds: float) -> list[dict]:
    groups = [make_group(tokens, seed) for seed in range(4)]
    frame_bytes = len(P.encode(groups[0]))
    payload = os.urandom(frame_bytes)
    expected = str(groups[0].n_tokens)

    def check_ack(_rid: bytes, reply) -> None:
        ack = P.decode(reply)
        if not (isinstance(ack, P.Ack) and ack.status == "accepted" and ack.reason == expected):
            raise RuntimeError(f"receiver rejected the group: {ack}")

    client, ours_sock, raw_sock = (Client(ours_addr, timeout_s=REQUEST_TIMEOUT_S),
                                   dealer(ours_addr), dealer(raw_addr))
    curve_sock, local_sock = dealer(curve_addr, keys), dealer(local_addr, keys)

    modes = {
        ("stream", "ours"): lambda s: round_stream(ours_sock, send_ours(groups), check_ack, s),
        ("stream", "raw"): lambda s: round_stream(raw_sock, send_raw(payload),
                                                  lambda rid, reply: None, s),
        ("stream", "curve"): lambda s: round_stream(curve_sock, send_ours(groups), check_ack, s),
        ("stream", "local"): lambda s: round_stream(local_sock, send_ours(groups), check_ack, s),
        ("stream", "built"): lambda s: round_stream(ours_sock, send_built(groups), check_ack, s),
        ("reqrep", "ours"): lambda s: round_reqrep_ours(client, groups, s),
        ("reqrep", "raw"): lambda s: round_reqrep_raw(raw_sock, payload, s),
    }
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in modes}
    cpu_s = {k: 0.0 for k in modes}  # both processes, all threads
    split_s = {k: [0.0] * 4 for k in modes}  # diagnostics: sender user/sys, receiver user/sys
    threads_s: dict[tuple, dict] = {k: {} for k in modes}  # (pid, tid) -> CPU seconds, by mode
    pids = (os.getpid(), receiver_pid)
    n_groups = {k: 0.0 for k in modes}
    try:
        for fn in modes.values():  # warm up connections, caches and codec plans
            fn(0.1)
        for _ in range(rounds):  # interleaved, so load spikes hit every mode alike
            for key, fn in modes.items():
                s0 = (*cpu_split_s(os.getpid()), *cpu_split_s(receiver_pid))
                t0 = thread_cpu_s(pids)
                c0, w0 = time.process_time() + child_cpu_s(receiver_pid), time.perf_counter()
                rate = fn(seconds)
                cpu_s[key] += time.process_time() + child_cpu_s(receiver_pid) - c0
                n_groups[key] += rate * (time.perf_counter() - w0)
                for i, (a, b) in enumerate(zip(s0, (*cpu_split_s(os.getpid()),
                                                    *cpu_split_s(receiver_pid)))):
                    split_s[key][i] += b - a
                for thread, cpu in thread_cpu_s(pids).items():
                    threads_s[key][thread] = (threads_s[key].get(thread, 0.0) + cpu
                                              - t0.get(thread, cpu))
                rates[key].append(rate)
    finally:
        client.close()
        ours_sock.close(linger=0)
        raw_sock.close(linger=0)
        curve_sock.close(linger=0)
        local_sock.close(linger=0)
    enc_us, dec_us = codec_cost_us(groups[0])
    costs = {"encode_us": enc_us, "decode_us": dec_us, "build_us": build_cost_us(groups[0])}
    return summary_lines(tokens, costs, frame_bytes, rates, cpu_s, split_s, threads_s, n_groups,
                         rounds, seconds, WINDOW, GOAL_WINDOW)


def main() -> int:
    global WINDOW
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=at_least_each(1), default=[512, 4096],
                        help="comma-separated output lengths")
    parser.add_argument("--rounds", type=at_least(1), default=7)
    parser.add_argument("--seconds", type=number_in(0), default=0.35,
                        help="duration of one round of one mode")
    parser.add_argument("--window", type=at_least(1), default=WINDOW,
                        help="requests in flight in the stream pattern")
    args = parser.parse_args()
    WINDOW = args.window
    ours_addr, raw_addr, curve_addr = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    keys_dir = tempfile.TemporaryDirectory(prefix="bench-keys-")
    local_addr = local_addresses(os.path.join(keys_dir.name, "sock"))[0]
    security.make_keys(keys_dir.name)
    keys = security.load(keys_dir.name, "rollout")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, ours_addr, raw_addr, curve_addr,
                                 keys_dir.name, local_addr],
                                stdout=subprocess.PIPE, text=True, env=env)
    try:
        import select

        ready, _, _ = select.select([receiver.stdout], [], [], READY_TIMEOUT_S)
        if not ready or receiver.stdout.readline().strip() != "READY":
            raise RuntimeError("receiver did not start")
        for tokens in args.tokens:
            for line in bench_size(tokens, ours_addr, raw_addr, curve_addr, local_addr, keys,
                                   receiver.pid,
                                   args.rounds, args.seconds):
                print(json.dumps(line), flush=True)
    finally:
        receiver.terminate()
        try:
            receiver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            receiver.kill()
            receiver.wait()
        keys_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
