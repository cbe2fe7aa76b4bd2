"""Load test on loopback: 32 producer threads and a fake trainer against a real ``python -m
buffer`` process (its memory watched), bounded time: zero lost, zero duplicated, memory bounded.
"""

from __future__ import annotations

import threading
import time

import psutil
from test_buffer_service import make_group

from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.peers import TRAINER_PEER
from areal_like.net.transport import TransportTimeout
from areal_like.settings.config import BufferConfig, RunConfig, SecurityConfig, TaskConfig, to_yaml
from areal_like.wire import protocol as P

# the daemons here talk to this test's plain sockets (CURVE: test_security)
PLAIN = SecurityConfig(curve=False)

N_PRODUCERS = 32
RUN_S = 4.0  # streaming time; bounded on purpose
REQUEST_S = 30.0  # per request: the machine is loaded, but a live buffer never takes this long
CAPACITY = 128
RSS_LIMIT_MB = 400  # interpreter + zmq + prometheus ~60 MB; 128 small groups are < 1 MB


def producer(address: str, server_id: str, stop: threading.Event, acked: list[str],
             errors: list[str]) -> None:
    client = Client(address, timeout_s=REQUEST_S)
    try:
        client.request(P.Register(server_id=server_id, engine_url="http://x", policy_version=0))
        while not stop.is_set():
            credits = client.request(P.CreditRequest(server_id=server_id, max_credits=2))
            # our "engine" follows the trainer: report the version we now serve
            if not credits.credits:
                client.request(P.Heartbeat(server_id=server_id,
                                           policy_version=credits.policy_version))
                time.sleep(0.02)
                continue
            for credit in credits.credits:  # finish what was leased, even after stop
                ack = client.request(make_group(credit, server_id, credits.policy_version,
                                                rewards=(0, 1, 0, 1), tokens=16))
                if ack.status == "accepted":
                    acked.append(ack.ref)
                else:
                    errors.append(f"{ack.ref}: {ack.status} {ack.reason}")
    except TransportTimeout as e:
        errors.append(f"{server_id}: {e}")
    finally:
        client.close()


def trainer(address: str, stop: threading.Event, delivered: list[str],
            versions: list[tuple[int, str]]) -> None:
    client = Client(address, timeout_s=REQUEST_S, identity=TRAINER_PEER)
    v, last = 0, ""
    try:
        while not stop.is_set():
            batch = client.request(P.BatchRequest(n_groups=8, trainer_version=v, wait_s=0.5,
                                                  ack_batch=last))
            if batch.groups:
                delivered.extend(g.group_id for g in batch.groups)
                v, last = v + 1, batch.batch_id
                client.request(P.VersionUpdate(policy_version=v))
        versions.append((v, last))
    finally:
        client.close()


def test_32_producers_zero_lost_zero_duplicated_memory_bounded(tmp_run_dir, spawn_python):
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=PLAIN,
                    task=TaskConfig(num_prompts=1_000_000), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        max_staleness=4, groups_per_step=8, max_inflight=64, capacity=CAPACITY,
        segment_bytes=1 << 20))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    proc = spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"], capture=False)
    client = Client(cfg.buffer.address, timeout_s=REQUEST_S)
    client.request(P.StatsRequest())  # ready
    daemon = psutil.Process(proc.pid)

    stop_producers, stop_trainer = threading.Event(), threading.Event()
    acked: list[str] = []
    errors: list[str] = []
    delivered: list[str] = []
    final_version: list[tuple[int, str]] = []  # (version, id of the last batch received)
    threads = [threading.Thread(target=producer,
                                args=(cfg.buffer.address, f"p{i}", stop_producers, acked, errors))
               for i in range(N_PRODUCERS)]
    threads.append(threading.Thread(target=trainer, args=(cfg.buffer.address, stop_trainer,
                                                          delivered, final_version)))
    for t in threads:
        t.start()
    peak_stored = peak_rss = 0
    t_end = time.monotonic() + RUN_S
    while time.monotonic() < t_end:
        s = client.request(P.StatsRequest()).values
        peak_stored = max(peak_stored, s["stored"])
        peak_rss = max(peak_rss, daemon.memory_info().rss)
        time.sleep(0.1)
    stop_producers.set()
    for t in threads[:-1]:
        t.join(timeout=REQUEST_S * 3)
    stop_trainer.set()
    threads[-1].join(timeout=REQUEST_S * 3)
    assert not any(t.is_alive() for t in threads)

    s = client.request(P.StatsRequest()).values
    v, last = final_version[0]
    # at least one group (n_groups >= 1 on the wire): with none stored the answer is empty
    rest = client.request(P.BatchRequest(n_groups=max(1, s["stored"]), trainer_version=v,
                                         wait_s=0.5, ack_batch=last))
    rest = rest if rest.groups else None
    remaining = [g.group_id for g in rest.groups] if rest else []
    s = client.request(P.StatsRequest()).values
    client.close()

    assert errors == []
    # every producer got work done
    assert len(acked) == len(set(acked)) and len(acked) > N_PRODUCERS
    out = delivered + remaining
    assert len(out) == len(set(out)), "a group was handed out twice"
    assert set(out) <= set(acked)
    dropped = s.get("groups_dropped_stale", 0)
    assert len(acked) == len(out) + dropped, "an acked group is unaccounted for"
    assert (s["groups_accepted"] == len(acked) and s["stored"] == 0
            and s.get("batches_redelivered", 0) == 0)
    assert peak_stored <= CAPACITY
    assert peak_rss < RSS_LIMIT_MB * 2**20, f"buffer RSS {peak_rss / 2**20:.0f} MB"
    print(f"load: {len(acked)} groups acked, {len(delivered)} trained on at {v} versions, "
          f"{dropped} stale, peak stored {peak_stored}, peak RSS {peak_rss / 2**20:.0f} MB")
