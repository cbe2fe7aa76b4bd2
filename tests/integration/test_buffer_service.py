"""BufferService over real ZMQ on loopback (in a thread); fake server/trainer Clients."""

from __future__ import annotations

import math
import shutil
import threading
import time
from contextlib import contextmanager

import msgpack
import msgspec
import numpy as np
import zmq

from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.net.peers import TRAINER_PEER
from areal_like.net.pubsub import Subscriber
from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService
from buffer.wal import WriteAheadLog

TIMEOUT_S = 30.0  # generous: the machine is shared and loaded


def make_cfg(run_dir, num_prompts=1000, **buffer_kw) -> RunConfig:
    buf = BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                       pub_address=f"tcp://127.0.0.1:{free_port()}",
                       **{"max_staleness": 1, "groups_per_step": 2, "lease_timeout_s": 60.0,
                          **buffer_kw})
    return RunConfig(run_dir=str(run_dir), buffer=buf, task=TaskConfig(num_prompts=num_prompts))


@contextmanager
def running(cfg: RunConfig, clock=time.monotonic):
    svc = BufferService.from_run(cfg, clock=clock)
    thread = threading.Thread(target=svc.serve, daemon=True)
    thread.start()
    # also announces versions
    client = Client(cfg.buffer.address, timeout_s=TIMEOUT_S, identity=TRAINER_PEER)
    try:
        client.request(P.StatsRequest())  # ready
        yield svc, client
    finally:
        client.close()
        svc.request_stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


def make_group(credit: P.Credit, server_id="s0", version=0, rewards=(0.0, 1.0),
               tokens=4) -> P.TrajectoryGroup:
    trajs = [Trajectory.of(prompt_ids=as_i32([7, 8]), output_ids=as_i32(np.arange(tokens)),
                          behav_logp=as_f32(np.full(tokens, -1.0)),
                          versions=as_i32(np.full(tokens, version)),
                          reward=float(r), finish_reason="stop") for r in rewards]
    return P.TrajectoryGroup(group_id=f"{server_id}-{credit.lease_id}", server_id=server_id,
                             lease_id=credit.lease_id, prompt_index=credit.prompt_index,
                             epoch=credit.epoch, trajectories=trajs)


def submit(group: P.TrajectoryGroup, want_credits: int = 0) -> P.GroupSubmit:
    """``group`` as a rollout server sends it: encoded once, asking for ``want_credits`` leases."""
    return P.GroupSubmit(group=P.encode_group(group), want_credits=want_credits)


def register(client, server_id="s0", version=0) -> None:
    ack = client.request(P.Register(server_id=server_id, engine_url="http://127.0.0.1:1",
                                    policy_version=version))
    assert isinstance(ack, P.RegisterAck)


def link_to(cfg: RunConfig, server_id: str, started: list, slots: int = 2, blocked=lambda: False):
    """A rollout server's BufferLink to cfg's buffer; leases start into started."""
    from areal_like.net.dealer import AsyncClient
    from areal_like.net.metrics import Metrics
    from rollout_server.buffer_link import BufferLink

    client = AsyncClient(cfg.buffer.address, timeout_s=TIMEOUT_S, identity=server_id)
    return BufferLink(client, client, server_id, Metrics(), free_slots=lambda: slots - len(started),
                      blocked=blocked, start=started.append)


def stats(client) -> dict:
    return client.request(P.StatsRequest()).values


def test_credits_groups_dedupe_and_batches(tmp_path):
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, c):
        assert c.request(P.CreditRequest(server_id="s0", max_credits=2)).reason == "unknown_server"
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=10))
        # eta = 1, B = 2, v = 0: (1 + 0 + 1) * 2 = 4 credits, then admission stops
        assert ([x.prompt_index for x in credits.credits] == [0, 1, 2, 3]
                and credits.reason == "staleness")
        groups = [make_group(x) for x in credits.credits]
        for g in groups:
            assert c.request(g).status == "accepted"
        assert c.request(groups[0]).status == "duplicate"
        batch = c.request(P.BatchRequest(n_groups=2, trainer_version=0, wait_s=5))
        # oldest first, then arrival
        assert [g.group_id for g in batch.groups] == ["s0-L0", "s0-L1"]
        np.testing.assert_array_equal(batch.groups[0].trajectories[1].output_ids, np.arange(4))
        assert c.request(groups[0]).status == "duplicate"  # consumed, still remembered
        sub = Subscriber(cfg.buffer.pub_address)
        try:
            time.sleep(0.3)  # slow joiner: let the subscription reach the publisher
            assert c.request(P.VersionUpdate(policy_version=1)).status == "ok"
            announced = sub.recv(TIMEOUT_S)
            assert isinstance(announced, P.VersionUpdate) and announced.policy_version == 1
        finally:
            sub.close()
        more = c.request(P.CreditRequest(server_id="s0", max_credits=10))
        # nothing consumed yet: 4 ahead, full
        assert more.credits == [] and more.reason == "staleness"
        s = stats(c)  # the batch is in transit until the next request acks it
        assert (s["groups_accepted"], s.get("groups_consumed", 0), s["stored"],
                s["in_transit"]) == (4, 0, 2, 2)
        ack = c.request(P.BatchRequest(n_groups=3, trainer_version=1, wait_s=0,
                                       ack_batch=batch.batch_id))
        assert ack.groups == [] and batch.batch_id
        # its engine got version 1 (else it waits for it)
        c.request(P.Heartbeat(server_id="s0", policy_version=1))
        more = c.request(P.CreditRequest(server_id="s0", max_credits=10))
        assert [x.prompt_index for x in more.credits] == [4, 5]  # 2 consumed + (1+1)*2 = 6 started
        s = stats(c)
        assert (s["groups_accepted"], s["groups_duplicate"], s["groups_consumed"],
                s["stored"]) == (4, 2, 2, 2)
        assert s["in_transit"] == 0
        assert s["policy_version"] == 1 and s["in_flight"] == 2 and s["credits_granted"] == 6
        text = scrape(f"http://127.0.0.1:{svc.metrics_server.port}/metrics")
        assert text['areal_buffer_groups{state="stored"}'] == 2
        assert (text["areal_buffer_staleness_count"] == 2
                and text["areal_buffer_trainer_version"] == 1)
        assert text["areal_buffer_credits_granted_total"] == 6
        assert any(k.startswith("areal_buffer_fsync_seconds_count") for k in text)


def test_bad_input_is_rejected_with_a_reason_and_the_daemon_keeps_serving(tmp_path):
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=4)).credits
        ack = c.request(make_group(credits[0], version=5))  # nobody published version 5
        assert ack.status == "rejected" and ack.reason.startswith("future_version")
        fake = P.Credit(lease_id="L99", prompt_index=0, epoch=0, deadline_s=1.0)
        ack = c.request(make_group(fake))
        assert ack.status == "rejected" and ack.reason.startswith("unknown_lease")
        huge = msgspec.structs.replace(make_group(credits[3]), group_id="x" * 5000)
        assert c.request(huge).reason.startswith("invalid_group_id")
        wrong = P.Credit(lease_id=credits[1].lease_id, prompt_index=42, epoch=0, deadline_s=1.0)
        assert c.request(make_group(wrong)).reason.startswith("lease_mismatch")
        # a NaN reward cannot be encoded by a well-behaved sender: patch the frame by hand
        wire = msgpack.unpackb(P.encode(make_group(credits[2])), raw=False)
        wire["trajectories"][0]["reward"] = math.nan
        # a Stats frame whose value is a list nested 50,000 deep, by hand: encoders recurse too
        nested = (b"\x83\xa4type\xa5stats\xa6values\x81\xa1a" + b"\x91" * 50_000
                  + b"\x90\xa8protocol" + bytes([P.PROTOCOL_VERSION]))
        raw = [msgpack.packb(wire, use_bin_type=True), nested,  # the socket is answered after it
               msgpack.packb({"type": "stats_request", "protocol": 99}),
               b"not msgpack at all \xc1"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(cfg.buffer.address)
        reasons = []
        try:
            for i, payload in enumerate(raw):
                sock.send_multipart([bytes([i]), payload])
                assert sock.poll(int(TIMEOUT_S * 1000))
                req_id, reply = sock.recv_multipart()
                ack = P.decode(reply)
                assert (req_id == bytes([i]) and ack.status == "rejected"
                        and ack.reason.startswith("decode"))
                reasons.append(ack.reason)
            assert ("trajectories[0].reward" in reasons[0] and "nested too deeply" in reasons[1]
                    and "protocol" in reasons[2] and "frame" in reasons[3])
        finally:
            sock.close(linger=0)
        s = stats(c)  # still serving
        assert s["rejected_decode"] == 4 and s["rejected_future_version"] == 1
        assert s["rejected_unknown_lease"] == 1 and s["rejected_lease_mismatch"] == 1
        # the prompts of the future-version and bad-id groups go out again; other leases stay valid
        again = c.request(P.CreditRequest(server_id="s0", max_credits=2)).credits
        assert [x.prompt_index for x in again] == [credits[0].prompt_index, credits[3].prompt_index]
        assert c.request(make_group(credits[2])).status == "accepted"


def test_capacity_back_pressure(tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=100, capacity=4, groups_per_step=2)
    with running(cfg) as (svc, c):
        register(c)
        first = c.request(P.CreditRequest(server_id="s0", max_credits=10))
        assert len(first.credits) == 4 and first.reason == "capacity"  # in-flight groups hold space
        for x in first.credits:
            assert c.request(make_group(x)).status == "accepted"
        none = c.request(P.CreditRequest(server_id="s0", max_credits=1))
        assert none.credits == [] and none.reason == "capacity"  # full: no credits, nothing dropped
        assert len(c.request(P.BatchRequest(n_groups=2, trainer_version=0)).groups) == 2
        assert len(c.request(P.CreditRequest(server_id="s0", max_credits=10)).credits) == 2
        assert stats(c).get("groups_dropped_stale", 0) == 0


def test_held_batch_request_and_empty_answer_after_wait(tmp_path):
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=2)).credits
        c.request(make_group(credits[0]))
        t0 = time.monotonic()
        empty = c.request(P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0.3))
        assert (empty.groups == [] and "1 of 2 fresh" in empty.reason
                and time.monotonic() - t0 >= 0.3)
        trainer = Client(cfg.buffer.address, timeout_s=TIMEOUT_S)
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("b", trainer.request(
            P.BatchRequest(n_groups=2, trainer_version=0, wait_s=TIMEOUT_S))))
        t.start()
        time.sleep(0.3)  # the request is held while the second group is produced
        c.request(make_group(credits[1]))
        t.join(TIMEOUT_S)
        trainer.close()
        assert len(got["b"].groups) == 2


def test_stale_groups_are_dropped_and_reissued_filtered_ones_return_their_slot(tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=0, groups_per_step=2, stale_policy="reissue",
                   filter_equal_rewards=True)
    with running(cfg) as (svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=4)).credits
        assert len(credits) == 2  # eta = 0: one step's worth
        c.request(make_group(credits[0]))
        c.request(P.VersionUpdate(policy_version=1))  # the trainer moved on without it
        s = stats(c)
        assert s["groups_dropped_stale"] == 1 and s["stored"] == 0 and s["reissue_queue"] == 1
        # valid lease, stale content
        assert c.request(make_group(credits[1], version=0)).status == "accepted"
        assert c.request(P.BatchRequest(n_groups=1, trainer_version=1, wait_s=0.1)).groups == []
        assert stats(c)["groups_dropped_stale"] == 2
        c.request(P.Heartbeat(server_id="s0", policy_version=1))
        again = c.request(P.CreditRequest(server_id="s0", max_credits=4)).credits
        # nothing consumed: 0 + (0+1)*2 = 2 limit, 2 started - 2 dropped = 0 -> 2 re-issued prompts
        # ((eta + v + 1) * B would admit 2 more at v = 1, as if a batch had been consumed at v = 0)
        assert [x.prompt_index for x in again] == [0, 1]
        # DAPO filter: an equal-reward group is acked, not stored, and its slot returns
        assert c.request(make_group(again[0], version=1, rewards=(1.0, 1.0))).status == "accepted"
        assert c.request(make_group(again[1], version=1, rewards=(0.0, 1.0))).status == "accepted"
        s = stats(c)
        assert (s["groups_dropped_equal_rewards"], s["stored"], s["started"]) == (1, 1, 1)
        more = c.request(P.CreditRequest(server_id="s0", max_credits=5)).credits
        # a new prompt (no re-issue): the trainer is not starved
        assert [x.prompt_index for x in more] == [2]


def test_roster_members_tokens_of_the_version_being_pushed_and_engines_behind(tmp_path):
    with running(make_cfg(tmp_path)) as (svc, c):
        c.request(P.Register(server_id="a", engine_url="http://127.0.0.1:7", policy_version=0,
                             engine_kind="vllm", sync_url="http://127.0.0.1:8"))
        register(c, "b")  # a server that says no kind and has no sync port
        got = {m.server_id: (m.engine_url, m.engine_kind, m.sync_url)
               for m in c.request(P.RosterRequest()).members}
        assert got == {"a": ("http://127.0.0.1:7", "vllm", "http://127.0.0.1:8"),
                       "b": ("http://127.0.0.1:1", "", "")}
        # tokens of the version being pushed (announced + 1) are accepted; newer are refused
        register(c)
        first, second = c.request(P.CreditRequest(server_id="s0", max_credits=2)).credits
        assert c.request(make_group(first, version=1)).status == "accepted"
        ack = c.request(make_group(second, version=2))
        assert ack.status == "rejected" and ack.reason.startswith("future_version"), ack
        # an engine further behind than eta gets no credits
        c.request(P.VersionUpdate(policy_version=1))
        c.request(P.VersionUpdate(policy_version=2))
        assert c.request(P.CreditRequest(server_id="a", max_credits=1)).reason == "stale_engine"
        c.request(P.Heartbeat(server_id="a", policy_version=1))  # 2 - 1 <= eta
        assert len(c.request(P.CreditRequest(server_id="a", max_credits=1)).credits) == 1
        # an unknown version (-1) is trusted, and checked at consumption
        c.request(P.Heartbeat(server_id="a", policy_version=-1))
        assert len(c.request(P.CreditRequest(server_id="a", max_credits=1)).credits) == 1


def test_a_silent_server_leaves_the_roster_and_comes_back_when_it_registers(tmp_path):
    now = [1000.0]
    cfg = make_cfg(tmp_path, heartbeat_timeout_s=10.0)
    with running(cfg, clock=lambda: now[0]) as (svc, c):
        register(c, "a")
        register(c, "b")
        assert sorted(m.server_id for m in c.request(P.RosterRequest()).members) == ["a", "b"]
        now[0] += 6.0
        assert c.request(P.Heartbeat(server_id="a", policy_version=0)).known
        now[0] += 6.0  # "b" silent for 12 s, "a" for 6 s
        deadline = time.monotonic() + TIMEOUT_S  # the sweep runs every POLL_S
        while ([m.server_id for m in c.request(P.RosterRequest()).members] != ["a"]
               and time.monotonic() < deadline):
            time.sleep(0.02)
        assert [m.server_id for m in c.request(P.RosterRequest()).members] == ["a"]
        assert c.request(P.Heartbeat(server_id="a", policy_version=0)).known
        assert not c.request(P.Heartbeat(server_id="b", policy_version=0)).known
        register(c, "b")  # comes back under the same id
        assert sorted(m.server_id for m in c.request(P.RosterRequest()).members) == ["a", "b"]



def test_expired_lease_is_reissued_to_the_next_requester(tmp_path):
    now = [1000.0]
    cfg = make_cfg(tmp_path, lease_timeout_s=30.0)
    with running(cfg, clock=lambda: now[0]) as (svc, c):
        register(c, "a")
        register(c, "b")
        (lease_a,) = c.request(P.CreditRequest(server_id="a", max_credits=1)).credits
        assert lease_a.deadline_s == 30.0
        now[0] += 31.0  # a stalls; the next loop iteration (<= POLL_S later) re-issues its prompt
        deadline = time.monotonic() + TIMEOUT_S
        while stats(c).get("credits_expired", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        register(c, "b")  # 31 s of silence also dropped both from the roster
        (lease_b,) = c.request(P.CreditRequest(server_id="b", max_credits=1)).credits
        assert (lease_b.prompt_index, lease_b.epoch) == (lease_a.prompt_index, lease_a.epoch)
        assert lease_b.lease_id != lease_a.lease_id
        late = c.request(make_group(lease_a, server_id="a"))
        assert late.status == "rejected" and late.reason.startswith("unknown_lease")
        assert c.request(make_group(lease_b, server_id="b")).status == "accepted"
        s = stats(c)
        assert (s["credits_expired"], s["credits_reissued"], s["credits_granted"]) == (1, 1, 2)


def test_a_group_asks_for_leases_with_its_ack_and_they_survive_a_restart(tmp_path):
    """want_credits: the Ack carries admitted leases, durable across a restart."""
    # (1 + 0 + 1) * 2 = 4 groups may start
    cfg = make_cfg(tmp_path, max_staleness=1, groups_per_step=2)
    with running(cfg) as (svc, c):
        register(c)
        (first,) = c.request(P.CreditRequest(server_id="s0", max_credits=1)).credits
        ack = c.request(submit(make_group(first), want_credits=2))
        assert ack.status == "accepted" and [x.prompt_index for x in ack.credits] == [1, 2]
        again = c.request(submit(make_group(ack.credits[0]), want_credits=5))
        # the bound: 4
        assert again.status == "accepted" and [x.prompt_index for x in again.credits] == [3]
        # durable before the Ack was sent: a copy of the WAL taken now
        # (nothing else was asked since) ends in a control record that grants that lease
        shutil.copytree(svc.wal.dir, tmp_path / "wal-copy")
        controls = [r.control for r in WriteAheadLog(tmp_path / "wal-copy").replay()
                    if r.kind == "C"]
        assert again.credits[0].lease_id in [x[0] for x in controls[-1]["changes"]["granted"]]
        # a future version
        bad = submit(make_group(ack.credits[1], version=9), want_credits=1)
        rejected = c.request(bad)
        assert rejected.status == "rejected" and rejected.credits == []
        assert stats(c)["credits_granted"] == 4
        granted_before_restart = [x.lease_id for x in again.credits]
    # same run_dir: recovered from the WAL; new ports (libzmq closes the old socket in its I/O
    # thread after close() returns: binding its port again at once can fail on a loaded machine)
    with running(make_cfg(tmp_path, max_staleness=1, groups_per_step=2)) as (svc, c):
        register(c)
        s = stats(c)
        assert (s["cursor_index"], s["stored"]) == (4, 2)
        lease = next(x for x in svc.ledger.leases.values()
                     if x.lease_id == granted_before_restart[0])
        assert lease.prompt_index == 3  # the lease an Ack carried is still outstanding
        late = c.request(make_group(P.Credit(lease_id=lease.lease_id, prompt_index=3, epoch=0,
                                             deadline_s=60.0)))
        assert late.status == "accepted"


def test_a_rollout_server_gets_its_next_leases_with_each_ack(tmp_path):
    """BufferLink asks free slots' leases with a group's first send (not during a sync), once for
    groups sent together."""
    import asyncio

    cfg = make_cfg(tmp_path, max_staleness=100, groups_per_step=2)
    with running(cfg) as (svc, c):
        register(c)
        first, second, third = c.request(P.CreditRequest(server_id="s0", max_credits=3)).credits
        started: list[P.Credit] = []  # no engine here: record the episodes it would start
        syncing = [False]

        async def scenario() -> None:
            link = link_to(cfg, "s0", started, blocked=lambda: syncing[0])
            try:
                assert link.wanted() == 2
                link.asked = 2  # e.g. a CreditRequest for them is in flight
                assert link.wanted() == 0
                link.asked = 0
                group = make_group(first)
                link.add(group)  # due: request_credits leaves it to the group
                assert await link.request_credits() and started == []
                assert await link.send(link.unacked[group.group_id])
                assert [x.prompt_index for x in started] == [3, 4] and link.asked == 0
                assert not link.unacked
                started.clear()
                # a re-send: answered as a duplicate, no lease
                link.add(make_group(first))
                resend = link.unacked[f"s0-{first.lease_id}"]
                resend.sends = 1
                assert await link.send(resend) and started == []
                link.add(make_group(second))
                task = asyncio.ensure_future(link.send(link.unacked[f"s0-{second.lease_id}"]))
                await asyncio.sleep(0)
                assert link.asked == 2  # asked for, the ack not back yet: a sync begins now
                syncing[0] = True
                assert await task
                assert started == [] and len(link.held) == 2  # held, not started
                assert link.wanted() == 0
                syncing[0] = False
                link.start_held()  # the main loop, once the sync is over
                assert [x.prompt_index for x in started] == [5, 6] and link.held == []
                syncing[0] = True  # during a sync nothing is asked for
                link.add(make_group(third))
                assert (await link.send(link.unacked[f"s0-{third.lease_id}"])
                        and len(started) == 2)
                syncing[0] = False
                started.clear()
                # due groups go out together and ask for the free slots' leases once
                more = await asyncio.to_thread(
                    c.request, P.CreditRequest(server_id="s0", max_credits=3))
                for credit in more.credits:
                    link.add(make_group(credit))
                assert await link.send(*link.unacked.values())
                assert not link.unacked and link.asked == 0
                assert [x.prompt_index for x in started] == [10, 11]
            finally:
                link.control.close()

        asyncio.run(scenario())
        s = stats(c)
        assert (s["groups_accepted"], s["groups_duplicate"], s["credits_granted"]) == (6, 1, 12)
