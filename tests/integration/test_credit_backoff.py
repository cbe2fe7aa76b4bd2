"""A rollout server's credit back-off and the trainer's announcements, against the real buffer
and a real PUB socket."""

from __future__ import annotations

import asyncio
import types

from test_buffer_service import TIMEOUT_S, link_to, make_cfg, make_group, register, running

from areal_like.net.distributed import free_port
from areal_like.net.metrics import Metrics
from areal_like.net.pubsub import Publisher
from areal_like.wire import protocol as P
from rollout_server import buffer_link
from rollout_server.server import RolloutServer


def test_a_refused_credit_request_is_asked_again_as_soon_as_the_trainer_announces(
        tmp_path, monkeypatch):
    """At eta 0 the sync's lease request can beat the trainer's batch request and be refused;
    the trainer's later announcement (``BufferLink.window_moved``) ends the back-off."""
    # the back-off outlasts any slow machine
    monkeypatch.setattr(buffer_link, "CREDIT_RETRY_S", 3600.0)
    cfg = make_cfg(tmp_path, max_staleness=0, groups_per_step=2)
    with running(cfg) as (svc, c):
        register(c, "a")
        for credit in c.request(P.CreditRequest(server_id="a", max_credits=2)).credits:
            assert c.request(make_group(credit, server_id="a")).status == "accepted"
        batch = c.request(P.BatchRequest(n_groups=2, trainer_version=0, wait_s=5))
        started: list[P.Credit] = []

        async def scenario() -> None:
            link = link_to(cfg, "a", started)
            try:
                assert await link.request_credits()
                assert started == [] and link.wanted() == 0  # refused, backing off
                # the server's heartbeat: its engine serves v1 (the sync's end said so)
                await asyncio.to_thread(c.request, P.Heartbeat(server_id="a", policy_version=1))
                await asyncio.to_thread(c.request,
                                        P.BatchRequest(n_groups=2, trainer_version=1, wait_s=0.05,
                                                       ack_batch=batch.batch_id))
                await asyncio.to_thread(c.request, P.VersionUpdate(policy_version=1))
                assert link.wanted() == 0  # without the announcement it would wait out the back-off
                link.window_moved()
                assert await link.request_credits()
                assert [x.prompt_index for x in started] == [2, 3]
            finally:
                link.control.close()

        asyncio.run(scenario())


def test_the_servers_announcement_loop_ends_the_back_off_and_wakes_the_main_loop():
    """On a VersionUpdate: the trainer-version gauge set, ``window_moved``, the main loop woken."""
    address = f"tcp://127.0.0.1:{free_port()}"
    pub = Publisher(address)
    moved = []
    server = types.SimpleNamespace(pub_address=address, metrics=Metrics(), wake=None,
                                   link=types.SimpleNamespace(
                                       window_moved=lambda: moved.append("moved")),
                                   facts=types.SimpleNamespace(keys=None))  # plain sockets

    async def scenario() -> None:
        server.wake = asyncio.Event()
        listening = asyncio.create_task(RolloutServer.announcements(server))
        try:
            async with asyncio.timeout(TIMEOUT_S):
                # PUB drops what it sends before the subscription lands
                while not server.wake.is_set():
                    pub.publish(P.VersionUpdate(policy_version=7))
                    await asyncio.sleep(0.05)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        pub.close()
    assert moved and set(moved) == {"moved"}
    assert "areal_rollout_trainer_version 7.0" in server.metrics.render().decode().splitlines()
