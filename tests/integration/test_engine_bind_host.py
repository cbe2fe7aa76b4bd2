"""On several nodes a rollout server's engine listens where trainer rank 0's log-prob guard can
reach it from the head node (the buffer's), not on a host name that resolves to loopback on its
own node (Debian's ``127.0.1.1 host``): there the guard reported the engine NOT CHECKED and
checked nothing. ``localhost`` stands in for such a name; this machine's own non-loopback address
for the head node. Real objects: a ``RolloutServer`` started here with its embedded engine, probed
through the URL it registers with the trainer's own ``probe_engine``."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from areal_like.net.auth import ENGINE_KEY_ENV, ensure_key_file
from areal_like.net.distributed import free_port, reachable_host
from areal_like.settings.config import load_config
from rollout_server.server import RolloutServer
from trainer.facts import TrainerFacts
from trainer.logprob_guard import elsewhere, probe_engine

SMALL = ["rollout.engine.max_running_requests=2", "rollout.engine.max_total_tokens=1024",
         "task.reward_workers=0", "security.curve=false"]


def own_address() -> str:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    pytest.skip("no non-loopback IPv4 interface here")


def test_a_loopback_host_name_gives_way_to_the_interface_toward_the_head():
    head = own_address()
    assert reachable_host("localhost", head) == head  # the route to a local address: itself
    assert reachable_host("127.0.0.1", "127.0.0.1") == "127.0.0.1"  # one node: unchanged
    assert reachable_host("localhost", "localhost") == "localhost"
    assert reachable_host(head, head) == head  # already reachable
    assert reachable_host("0.0.0.0", head) == "0.0.0.0"  # every interface: unchanged
    assert reachable_host("localhost", "no-such-host.invalid") == "localhost"  # no route: as is


def test_an_engine_on_another_node_registers_a_url_the_guard_probes(tmp_run_dir, monkeypatch):
    head = own_address()
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    key = ensure_key_file(tmp_run_dir)
    cfg = load_config([f"run_dir={tmp_run_dir}", *SMALL, "launch.nodes=2",
                       "rollout.engine.host=localhost",
                       f"rollout.buffer_address=tcp://{head}:{free_port()}"])
    server = RolloutServer.from_run(cfg)
    server.start()
    try:
        assert server.engine_url.startswith(f"http://{head}:"), server.engine_url
        assert elsewhere(server.engine_url, several_nodes=True) is None  # the guard checks it
        probe = probe_engine("rollout-0", server.engine_url, [1, 2, 3], 1.0,
                             api_key=TrainerFacts.from_run(cfg).engine_key)
        assert key and probe.output_ids
    finally:
        server.stop()
