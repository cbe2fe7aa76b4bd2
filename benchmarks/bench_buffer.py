"""Buffer ingest and hand-out against the raw transport, same frames, same run.

Cases (one JSON line each):
* ``raw_transport``: 32 producers send GroupSubmit frames to a bare ROUTER that answers each
  with a pre-encoded Ack (no decode, no disk): the transport ceiling;
* ``buffer_ingest_fsync_<policy>``: the same producers, the same frames, to ``python -m buffer``
  (decode, validate, WAL append, group-commit fsync, ack); each producer leases prompts first,
  as a rollout server does; ratio = groups/s over the raw case's (goal >= 0.5 for fsync=always);
* ``disk_ceiling_group_commit``: the same frames appended by one thread while another fdatasyncs
  what was written so far (the WAL's scheme), one process, no network: what the disk allows an
  fsync=always buffer, whatever the transport does; ``disk_ceiling_sequential``: write
  ``producers`` frames, fsync, repeat (no overlap; the figure this benchmark used to call the
  ceiling, which a pipelined log is not bound by); ``wal_ceiling``: the buffer's own
  ``WriteAheadLog`` (fsync=always: group commit, as the daemon runs it) fed the same
  frames in one process with ``producers`` sync tickets outstanding, no network: what the log
  itself allows;
* ``raw_transport_keeping_frames`` (``--raw-keep``): the raw server also keeps every frame in
  memory, as the store does: what holding the data costs before any protocol work;
* ``buffer_handout``: BatchRequest latency p50/p99 with the store full, n_groups per batch (each
  request acks the previous batch, as the trainer does), and the buffer's CPU per batch
  (``server_cpu_ms_per_batch``: less sensitive to a shared machine's load than the latency);
* ``control_record_<n>_leases``: the control record the buffer logs after a loop iteration that
  closed one lease and granted one, with ``n`` leases outstanding: CPU to build and encode it as
  logged now (what changed, ``CreditLedger.take_changes``) against the whole state, which is what
  every iteration used to log (and what a checkpoint still holds); bytes of both.
  In process, no I/O;
* ``buffer_ingest_curve_capacity`` (``--curve-io-threads 1 N``): the same producers over tcp with
  CURVE on (each holding the job's ``rollout`` key, as rollout servers on other nodes do), fsync
  always, to a buffer with ``buffer.io_threads`` = N as ``figure`` and 1 as ``baseline``: what one
  buffer ingests with every frame encrypted, and what spreading CURVE's cipher over I/O threads
  (one connection on one thread) adds. ``cluster_need_groups_s`` is what a large cluster generates
  (benchmarks/README.md, "CURVE capacity"), ``need_ratio`` the figure over it; with more than two
  values (``--curve-io-threads 1 2 4 8``), ``by_io_threads`` holds each one's median;
* ``buffer_memory``: resident memory of the daemon per 100,000 stored trajectories (RSS growth
  over the ingest / stored trajectories); baseline = their frame bytes; ratio = frame bytes / RSS.
  The daemon keeps only an index in its own memory: the frames stay in the WAL, on disk or in the
  page cache, which RSS does not count; ``wal_mib_per_100k`` reports what the WAL
  holds.

The raw and buffer cases run in ``--rounds`` interleaved rounds (raw, buffer always, buffer
never, raw, ...), each with its own daemon and WAL directory, deleted and synced to disk before the
next case starts (on a file system mounted with ``discard`` the deletion of a case's GBs otherwise
loads the disk during the next one); a case's ratio is the median over rounds of its
rate against the raw rate of the same round, so load from other work on a shared machine hits
both sides of a ratio alike (``ratios`` lists them).

Every ingest case also reports ``server_cpu_ms_per_group`` and ``producer_cpu_ms_per_group``: CPU
seconds (all threads, user + system) over the measured window per acknowledged group. On a shared
machine they vary less than the rates and show where the time goes. ``machine_idle_share`` and
``machine_iowait_share`` say how much of the whole machine's CPU time in that window was idle, and
idle with disk I/O outstanding: a case with idle cores is bound by latency (the group commit's
disk round trip, the producers' one request in flight each), not by CPU.

Producers run in several processes with several threads each (one DEALER socket per thread) so
that producer-side Python does not cap either case, and they do not encode: each thread packs its
trajectories once and rewrites only the group's ids near the end of its GroupSubmit frame per group
(``FrameWriter``), in both cases. The buffer case also leases its prompts as a rollout server does:
every group asks for the next lease with its ack (``want_credits=1``), and a producer holding no
lease sends a CreditRequest (the raw case sends the same frames and ignores that field).

    .venv/bin/python benchmarks/bench_buffer.py                 # defaults, < 60 s
    .venv/bin/python benchmarks/bench_buffer.py --tokens 512 --seconds 3 --fsync always never
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import msgpack
import numpy as np
import psutil
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from transport_report import at_least, load_warning, number_in  # noqa: E402

from areal_like.net import security  # noqa: E402
from areal_like.net.dealer import Client  # noqa: E402
from areal_like.net.distributed import free_port  # noqa: E402
from areal_like.settings.config import (  # noqa: E402
    BufferConfig,
    LaunchConfig,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    to_yaml,
)
from areal_like.wire import protocol as P  # noqa: E402
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32  # noqa: E402
from buffer.credits import CreditLedger  # noqa: E402
from buffer.staleness import StalenessPolicy  # noqa: E402
from buffer.wal import WriteAheadLog  # noqa: E402

DISK_SECONDS = 3.0  # per disk ceiling: the disk alone varies less than the network cases
# 1,024 GPUs decoding a 7B model at ~15,000 output tokens/s each (the order SGLang and vLLM publish
# for 7-8B models at large batch on one H100), in groups of 8 x 4,096 generated tokens
CLUSTER_NEED_GROUPS_S = 1024 * 15_000 / (8 * 4096)
REPLY_TIMEOUT_MS = 20_000  # a producer waiting this long means the server is gone: abort the case
RAW_SERVER = ("""
import sys, zmq
ack = bytes.fromhex(sys.argv[2])  # a pre-encoded Ack: the raw server does no protocol work at all
kept = [] if sys.argv[3] == "keep" else None"""
              """  # keep every frame in memory, as the buffer's store does
sock = zmq.Context.instance().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    peer, req_id, payload = sock.recv_multipart(copy=False)
    if kept is not None:
        kept.append(payload)
    sock.send_multipart([peer, req_id, ack])
""")


def trajectories_blob(tokens: int, group_size: int, prompt_tokens: int = 256) -> bytes:
    """The msgpack bytes of a group's ``trajectories`` field, packed once and reused."""
    rng = np.random.default_rng(0)
    trajs = [Trajectory.of(prompt_ids=as_i32(rng.integers(0, 100, prompt_tokens)),
                          output_ids=as_i32(rng.integers(0, 100, tokens)),
                          behav_logp=as_f32(-rng.random(tokens)), versions=as_i32(np.zeros(tokens)),
                          reward=float(i % 2), finish_reason="length") for i in range(group_size)]
    group = P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                              trajectories=trajs)
    return msgpack.packb(msgpack.unpackb(P.encode(group), raw=False)["trajectories"],
                         use_bin_type=True)


def _frame_prefix(blob: bytes, submit: bool = True) -> bytes:
    """A GroupSubmit frame (``submit``; else its TrajectoryGroup frame) up to the group's ids: the
    map headers, type, protocol and the trajectories (msgpack maps are unordered; the ids come
    last so that only they change between groups)."""
    head = [msgpack.Packer().pack_map_header(4), *map(msgpack.packb, ("type", "group_submit",
                                                                      "group"))] if submit else []
    head += [msgpack.Packer().pack_map_header(8)]
    head += [msgpack.packb(x) for x in ("type", "trajectory_group", "protocol", P.PROTOCOL_VERSION,
                                        "trajectories")]
    return b"".join([*head, blob])


def _frame_suffix(server_id: str, lease_id: str, prompt_index: int, epoch: int,
                  want_credits: int | None = 1) -> bytes:
    """The group's ids, then (``want_credits`` not None) the rest of its GroupSubmit."""
    ids = {"group_id": f"{server_id}-{lease_id}", "server_id": server_id, "lease_id": lease_id,
           "prompt_index": prompt_index, "epoch": epoch}
    if want_credits is not None:
        ids |= {"want_credits": want_credits, "protocol": P.PROTOCOL_VERSION}
    return b"".join(msgpack.packb(x) for kv in ids.items() for x in kv)


def group_frame(blob: bytes, server_id: str, lease_id: str, prompt_index: int, epoch: int) -> bytes:
    """A TrajectoryGroup frame built around the pre-packed trajectories (what the WAL stores)."""
    return (_frame_prefix(blob, submit=False)
            + _frame_suffix(server_id, lease_id, prompt_index, epoch, want_credits=None))


class FrameWriter:
    """One producer's frames without per-group encoding or copying: the trajectories are packed
    once into a buffer and only the ids at its end are rewritten per group (in place; the frame is
    sent without a copy and rewritten only after its reply, i.e. once it has left). The raw and
    the buffer cases send these same frames, so neither pays producer-side encoding."""

    MAX_SUFFIX = 4096

    def __init__(self, blob: bytes):
        prefix = _frame_prefix(blob)
        self.n_prefix = len(prefix)
        self.buf = bytearray(self.n_prefix + self.MAX_SUFFIX)
        self.buf[:self.n_prefix] = prefix
        self.view = memoryview(self.buf)

    def frame(self, server_id: str, lease_id: str, prompt_index: int, epoch: int) -> memoryview:
        suffix = _frame_suffix(server_id, lease_id, prompt_index, epoch)
        end = self.n_prefix + len(suffix)
        self.buf[self.n_prefix:end] = suffix
        return self.view[:end]


def _request(sock: zmq.Socket, payload: bytes | memoryview) -> bytes:
    req_id = uuid.uuid4().bytes
    sock.send_multipart([req_id, payload], copy=False)
    while True:
        if not sock.poll(REPLY_TIMEOUT_MS):
            raise TimeoutError("no reply")
        rid, reply = sock.recv_multipart()
        if rid == req_id:
            return reply


def _producer_thread(mode, address, sid, blob, t_start, t_stop, counts, lock, keys):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    security.apply(sock, keys)  # a CURVE client with the rollout key when the case runs with CURVE
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    n = nbytes = 0
    if mode == "buffer":
        _request(sock, P.encode(P.Register(server_id=sid, engine_url="http://x", policy_version=0)))
    counter = 0
    writer = FrameWriter(blob)
    leases: deque[tuple[str, int, int]] = deque()
    while time.time() < t_stop:
        # holding no lease: ask for some (a rollout server asks for its free slots)
        if not leases and mode == "buffer":
            credits = P.decode(_request(sock, P.encode(P.CreditRequest(server_id=sid,
                                                                       max_credits=4)))).credits
            leases.extend((c.lease_id, c.prompt_index, c.epoch) for c in credits)
            if not leases:
                time.sleep(0.005)
                continue
        elif not leases:
            leases.extend((f"L{counter + i}", counter + i, 0) for i in range(4))
            counter += 4
        # asks for the next lease with its ack (want_credits=1)
        frame = writer.frame(sid, *leases.popleft())
        reply = _request(sock, frame)
        if mode == "buffer":
            ack = P.decode(reply)
            assert ack.status == "accepted", ack
            leases.extend((c.lease_id, c.prompt_index, c.epoch) for c in ack.credits)
        if t_start <= time.time() <= t_stop:
            n, nbytes = n + 1, nbytes + len(frame)
    sock.close()
    with lock:
        counts[0] += n
        counts[1] += nbytes


def _producer_process(mode, address, wid, threads, tokens, group_size, t_start, t_stop, out, keys):
    keys = security.load(keys, "rollout") if keys is not None else None
    blob = trajectories_blob(tokens, group_size)
    counts, lock = [0, 0], threading.Lock()
    ts = [threading.Thread(target=_producer_thread, args=(mode, address, f"w{wid}-{i}", blob,
                                                          t_start, t_stop, counts, lock, keys))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((wid, *counts))


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _cpu_in_window(pids: list[int], t_start: float, t_stop: float, out: dict) -> None:
    """CPU seconds the processes spend between t_start and t_stop (all their threads)."""
    time.sleep(max(0.0, t_start - time.time()))
    before = _cpu_seconds(pids)
    time.sleep(max(0.0, t_stop - time.time()))
    out["cpu_s"] = _cpu_seconds(pids) - before


def _machine_in_window(t_start: float, t_stop: float, out: dict) -> None:
    """Shares of the whole machine's CPU time between t_start and t_stop that were idle, and idle
    with I/O outstanding (iowait): how far a case is from using every core."""
    time.sleep(max(0.0, t_start - time.time()))
    before = psutil.cpu_times()
    time.sleep(max(0.0, t_stop - time.time()))
    delta = {k: v - getattr(before, k) for k, v in psutil.cpu_times()._asdict().items()}
    # guest time is in user
    total = sum(v for k, v in delta.items() if k not in ("guest", "guest_nice")) or 1.0
    out["idle"] = delta.get("idle", 0.0) / total
    out["iowait"] = delta.get("iowait", 0.0) / total


def run_producers(mode: str, address: str, args, server_pid: int, keys: str | None = None
                  ) -> tuple[float, float, dict]:
    """Returns (groups/s, MB/s, CPU ms per group of the server and of the producers) over the
    measured window. CPU per group does not depend on how busy the shared machine is."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t_start = time.time() + args.warmup_s + 2.0  # 2 s for the spawned processes to import
    t_stop = t_start + args.seconds
    per = args.producers // args.processes
    procs = [ctx.Process(target=_producer_process, args=(mode, address, w, per, args.tokens,
                                                         args.group_size,
                                                         t_start, t_stop, out, keys))
             for w in range(args.processes)]
    for p in procs:
        p.start()
    server_cpu, producer_cpu, machine = {}, {}, {}
    meters = [threading.Thread(target=_cpu_in_window, args=(pids, t_start, t_stop, into),
                               daemon=True)
              for pids, into in (([server_pid], server_cpu),
                                 ([p.pid for p in procs], producer_cpu))]
    meters.append(threading.Thread(target=_machine_in_window, args=(t_start, t_stop, machine),
                                   daemon=True))
    for m in meters:
        m.start()
    results, deadline = [], time.time() + args.seconds + args.warmup_s + 120
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:  # failed: a producer died before reporting its counts (or none reports)
            reported = {r[0] for r in results}
            dead = [p.exitcode for w, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and w not in reported]
            if dead or time.time() > deadline:
                raise SystemExit(f"{mode}: a producer process failed (exit codes {dead}) "
                                 "or hung") from None
    for p in procs:
        p.join(timeout=30)
    # counts reported, then a crash on the way out: say so, keep the counts
    for w, p in enumerate(procs):
        if p.exitcode not in (None, 0):
            print(f"warning: {mode} producer {w} exited with code {p.exitcode} "
                  "after reporting its counts",
                  file=sys.stderr, flush=True)
    for m in meters:
        m.join(timeout=5)
    n = sum(r[1] for r in results)
    if n == 0:
        raise SystemExit(f"{mode}: no group was acknowledged in the measured window")
    cpu = {"server_cpu_ms_per_group": round(server_cpu.get("cpu_s", 0) / n * 1e3, 3),
           "producer_cpu_ms_per_group": round(producer_cpu.get("cpu_s", 0) / n * 1e3, 3),
           "machine_idle_share": round(machine.get("idle", 0.0), 3),
           "machine_iowait_share": round(machine.get("iowait", 0.0), 3)}
    return n / args.seconds, sum(r[2] for r in results) / args.seconds / 1e6, cpu


def start_buffer(run_dir: Path, fsync: str, env: dict, io_threads: int = 0, producers: int = 32
                 ) -> tuple[subprocess.Popen, RunConfig]:
    """The buffer daemon; ``io_threads`` > 0: with CURVE on (keys in run_dir/keys) and that many I/O
    threads, else plain sockets on both sides (the buffer's work against the raw transport; what
    CURVE costs one stream is bench_transport.py's transport_stream_8xT_curve)."""
    buf = BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                       pub_address=f"tcp://127.0.0.1:{free_port()}",
                       max_staleness=1_000_000, groups_per_step=8, max_inflight=4096,
                       capacity=10_000_000,
                       fsync=fsync, io_threads=max(io_threads, 1))
    cfg = RunConfig(run_dir=str(run_dir),
                    security=SecurityConfig(curve=io_threads > 0, local_ipc=False),
                    task=TaskConfig(num_prompts=10_000_000), buffer=buf,
                    # a context that holds the long groups measured (the buffer refuses longer)
                    model=ModelConfig(max_position_embeddings=1 << 20),
                    # every producer a server id
                    launch=LaunchConfig(num_rollout_servers=producers))
    run_dir.mkdir(parents=True)
    if io_threads:
        security.make_keys(run_dir / "keys")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "buffer", "--config-file",
                             str(run_dir / "config.yaml")],
                            env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    keys = security.load(run_dir / "keys", "trainer") if io_threads else None
    Client(cfg.buffer.address, keys=keys, timeout_s=60).request(P.StatsRequest())  # ready
    return proc, cfg


def handout_latency(address: str, n_groups: int, trials: int) -> tuple[float, float]:
    client = Client(address, timeout_s=60)
    lat, last = [], ""
    for _ in range(trials):
        t0 = time.perf_counter()
        batch = client.request(P.BatchRequest(n_groups=n_groups, trainer_version=0, wait_s=0,
                                              ack_batch=last))
        lat.append(time.perf_counter() - t0)
        assert len(batch.groups) == n_groups, batch.reason
        last = batch.batch_id  # acked by the next request, as the trainer does
    client.close()
    lat.sort()
    return statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3


def disk_ceiling(directory: Path, args, kind: str) -> tuple[float, float]:
    """The benchmark's frames written and synced for up to DISK_SECONDS by one process, no network.

    ``sequential``: write ``producers`` frames, fsync, repeat (the disk idles while frames are
    written, the writer idles during the fsync). ``group_commit``: what the WAL does, so what
    bounds an fsync=always buffer: one thread appends continuously to a segment while another
    fdatasyncs whatever was written so far."""
    frame = group_frame(trajectories_blob(args.tokens, args.group_size), "disk", "L0", 0, 0)
    path = directory / "disk_ceiling.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    n, stop, seconds = 0, threading.Event(), min(args.seconds, DISK_SECONDS)

    def sync_loop():
        synced = 0
        while not stop.is_set():
            if n == synced:  # nothing new: the WAL's syncer waits for a request too
                time.sleep(0.0005)
                continue
            synced = n
            os.fdatasync(fd)

    syncer = threading.Thread(target=sync_loop)
    t0 = time.perf_counter()
    try:
        if kind == "group_commit":
            syncer.start()
        while time.perf_counter() - t0 < seconds:
            for _ in range(args.producers):
                os.writev(fd, [frame])
            if kind == "sequential":
                os.fsync(fd)
            n += args.producers
        stop.set()
        if kind == "group_commit":
            syncer.join()
            os.fdatasync(fd)
    finally:
        stop.set()
        os.close(fd)
        path.unlink()
    dt = time.perf_counter() - t0
    return n / dt, n * len(frame) / dt / 1e6


def wal_ceiling(directory: Path, args) -> tuple[float, float]:
    """Groups/s through the WAL alone: append, take a ticket, keep ``producers`` tickets
    outstanding."""
    frame = group_frame(trajectories_blob(args.tokens, args.group_size), "disk", "L0", 0, 0)
    wal = WriteAheadLog(directory / "wal_ceiling", segment_bytes=BufferConfig().segment_bytes)
    list(wal.replay())
    wal.open({})
    tickets: deque[int] = deque()
    n, seconds, t0 = 0, min(args.seconds, DISK_SECONDS), time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            wal.append_group(f"g{n}", frame)
            tickets.append(wal.request_sync())
            n += 1
            while tickets and (len(tickets) >= args.producers or wal.durable() >= tickets[0]):
                if wal.durable() >= tickets[0]:
                    tickets.popleft()
                else:
                    time.sleep(0.0002)  # the daemon's loop would be receiving meanwhile
        wal.wait_durable()
    finally:
        wal.close()
        shutil.rmtree(directory / "wal_ceiling", ignore_errors=True)
    dt = time.perf_counter() - t0
    return n / dt, n * len(frame) / dt / 1e6


def emit(**row) -> None:
    print(json.dumps({**row, **load_warning()}), flush=True)


def run_raw(keep: str, args, env: dict) -> tuple[float, float, dict]:
    ack = P.encode(P.Ack(ref="x", status="accepted")).hex()
    address = f"tcp://127.0.0.1:{free_port()}"
    raw = subprocess.Popen([sys.executable, "-c", RAW_SERVER, address, ack, keep], env=env,
                           cwd=REPO)
    try:
        return run_producers("raw", address, args, raw.pid)
    finally:
        raw.kill()
        raw.wait()


def memory_and_handout(address: str, pid: int, rss0: int, args, common: dict) -> None:
    stats = Client(address, timeout_s=60).request(P.StatsRequest()).values
    n_traj = stats["stored"] * args.group_size
    rss = psutil.Process(pid).memory_info().rss - rss0
    per_100k, payload_100k = (rss / n_traj * 1e5 / 2**20,
                              stats["stored_bytes"] / n_traj * 1e5 / 2**20)
    emit(name="buffer_memory", figure=round(per_100k, 1), unit="MiB per 100k stored trajectories",
         baseline=round(payload_100k, 1), ratio=round(payload_100k / per_100k, 3), goal=None,
         wal_mib_per_100k=round(stats["wal_bytes"] / n_traj * 1e5 / 2**20, 1),
         stored_trajectories=n_traj, **common)
    trials = min(200, stats["stored"] // args.handout_groups)
    cpu0 = _cpu_seconds([pid])
    p50, p99 = handout_latency(address, args.handout_groups, trials)
    cpu_ms = (_cpu_seconds([pid]) - cpu0) / trials * 1e3  # the buffer's, per batch: load-robust
    emit(name="buffer_handout", figure=round(p50, 2), unit="ms p50", baseline=None, ratio=None,
         goal=None, p99_ms=round(p99, 2), server_cpu_ms_per_batch=round(cpu_ms, 3),
         n_groups=args.handout_groups, trials=trials, **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=at_least(1), default=4096)
    ap.add_argument("--group-size", type=at_least(1), default=8)
    ap.add_argument("--producers", type=at_least(1), default=32)
    ap.add_argument("--processes", type=at_least(1), default=4)
    ap.add_argument("--seconds", type=number_in(0), default=4.0)
    ap.add_argument("--warmup-s", type=number_in(0, low_ok=True), default=1.0)
    ap.add_argument("--rounds", type=at_least(1), default=2,
                    help="raw and buffer runs alternate this many times")
    ap.add_argument("--fsync", nargs="+", default=["always", "never"],
                    choices=("always", "batch", "never"))
    ap.add_argument("--handout-groups", type=at_least(1), default=8)
    ap.add_argument("--curve-io-threads", type=at_least(1), nargs="*", default=[],
                    help="CURVE capacity: buffer.io_threads values to ingest with CURVE on and "
                         "fsync=always (the first is the baseline), e.g. 1 2")
    ap.add_argument("--raw-keep", action="store_true",
                    help="also run the raw server keeping every frame in memory "
                         "(what storing them costs)")
    args = ap.parse_args()
    if len(args.curve_io_threads) == 1:  # its line compares two: it would run and print nothing
        ap.error("--curve-io-threads takes a baseline and the values to compare, e.g. 1 2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "AREAL_LIKE_LOG_LEVEL": "WARNING"}
    common = {"tokens": args.tokens, "group_size": args.group_size, "producers": args.producers}
    cases = ["raw", *(["raw_keep"] if args.raw_keep else []), *args.fsync,
             *(f"curve{n}" for n in args.curve_io_threads)]
    runs: dict[str, list[tuple[float, float, dict]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench_buffer_") as tmp:
        for r in range(args.rounds):  # interleaved: load from other work hits every case alike
            for case in cases:
                if case.startswith("raw"):
                    runs[case].append(run_raw("keep" if case == "raw_keep" else "drop", args, env))
                    continue
                threads = int(case[len("curve"):]) if case.startswith("curve") else 0
                run_dir = Path(tmp) / f"{case}-{r}"
                proc, cfg = start_buffer(run_dir, "always" if threads else case, env, threads,
                                         args.producers)
                try:
                    rss0 = psutil.Process(proc.pid).memory_info().rss
                    keys = str(run_dir / "keys") if threads else None
                    runs[case].append(run_producers("buffer", cfg.buffer.address, args, proc.pid,
                                                    keys))
                    if r == args.rounds - 1 and case == args.fsync[0]:
                        memory_and_handout(cfg.buffer.address, proc.pid, rss0, args, common)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                    shutil.rmtree(Path(tmp) / f"{case}-{r}", ignore_errors=True)
                    # the next case must not pay for this one's deleted GBs (writeback, discards)
                    os.sync()
        disk = {kind: disk_ceiling(Path(tmp), args, kind)
                for kind in ("sequential", "group_commit")}
        wal_gps, wal_mbps = wal_ceiling(Path(tmp), args)
    raw = runs["raw"]
    raw_gps = statistics.mean(x[0] for x in raw)
    for case in (c for c in cases if not c.startswith("curve")):
        gps = statistics.mean(x[0] for x in runs[case])
        # each run against the raw run of its round
        ratios = [x[0] / base[0] for x, base in zip(runs[case], raw)]
        cpu = {k: round(statistics.mean(x[2][k] for x in runs[case]), 3) for k in runs[case][0][2]}
        name = {"raw": "raw_transport", "raw_keep": "raw_transport_keeping_frames"}.get(
            case, f"buffer_ingest_fsync_{case}")
        extra = ({"of_disk_ceiling": round(gps / disk["group_commit"][0], 3)}
                 if case not in ("raw", "raw_keep") else {})
        emit(name=name, figure=round(gps, 1), unit="groups/s", baseline=round(raw_gps, 1),
             ratio=round(statistics.median(ratios), 3), goal=0.5 if case == "always" else None,
             ratios=[round(x, 3) for x in ratios],
             mb_per_s=round(statistics.mean(x[1] for x in runs[case]), 1),
             **extra, **cpu, **common)
    if len(args.curve_io_threads) >= 2:
        curve_line(args, runs, common)
    for kind, (gps, mbps) in disk.items():
        emit(name=f"disk_ceiling_{kind}", figure=round(gps, 1), unit="groups/s",
             baseline=round(raw_gps, 1),
             ratio=round(gps / raw_gps, 3), goal=None, mb_per_s=round(mbps, 1), **common)
    emit(name="wal_ceiling", figure=round(wal_gps, 1), unit="groups/s", baseline=round(raw_gps, 1),
         ratio=round(wal_gps / raw_gps, 3), goal=None, mb_per_s=round(wal_mbps, 1), **common)
    for leases in (64, 4096):
        control_record_cost(leases)


def curve_line(args, runs: dict, common: dict) -> None:
    """The CURVE capacity line: ingest with the last ``--curve-io-threads`` value against the
    first."""
    base_n, n = args.curve_io_threads[0], args.curve_io_threads[-1]
    base, got = runs[f"curve{base_n}"], runs[f"curve{n}"]
    gps, base_gps = statistics.median(x[0] for x in got), statistics.median(x[0] for x in base)
    emit(name="buffer_ingest_curve_capacity", figure=round(gps, 1), unit="groups/s",
         baseline=round(base_gps, 1), ratio=round(gps / base_gps, 3), goal=None, io_threads=n,
         baseline_io_threads=base_n, fsync="always",
         mb_per_s=round(statistics.median(x[1] for x in got), 1),
         cluster_need_groups_s=round(CLUSTER_NEED_GROUPS_S, 1),
         need_ratio=round(gps / CLUSTER_NEED_GROUPS_S, 3),
         rounds=[round(x[0], 1) for x in got], baseline_rounds=[round(x[0], 1) for x in base],
         by_io_threads={m: round(statistics.median(x[0] for x in runs[f"curve{m}"]), 1)
                        for m in args.curve_io_threads},
         cores=len(os.sched_getaffinity(0)), **{k: v for k, v in got[-1][2].items()}, **common)


def control_record_cost(leases: int, iterations: int = 300) -> None:
    """One loop iteration's control record with ``leases`` outstanding: changes against whole
    state."""
    import msgspec

    encoder = msgspec.msgpack.Encoder()  # the WAL's control encoder
    ledger = CreditLedger(StalenessPolicy(10**9, 8, 10**9), 10**9, lease_timeout_s=60.0,
                          clock=time.monotonic)
    servers = [f"rollout-server-{i:02d}" for i in range(64)]
    ledger.grant(servers[0], leases)
    ledger.take_changes()
    cost, size = {}, {}
    for how, build in (("whole", ledger.state), ("changes", ledger.take_changes)):
        t0 = time.process_time()
        # one group delivered (its lease closes), one lease granted with the ack
        for i in range(iterations):
            ledger.fulfil(next(iter(ledger.leases)))
            ledger.grant(servers[i % 64], 1)
            record = encoder.encode({"changes" if how == "changes" else "state":
                                     {**build(), "version": 0, "in_transit": None}})
        cost[how], size[how] = 1e6 * (time.process_time() - t0) / iterations, len(record)
    emit(name=f"control_record_{leases}_leases", figure=round(cost["changes"], 1),
         unit="us per iteration", baseline=round(cost["whole"], 1),
         ratio=round(cost["whole"] / cost["changes"], 1), goal=None,
         bytes=size["changes"], baseline_bytes=size["whole"], leases=leases)


if __name__ == "__main__":
    main()
