"""Real hosts (network namespaces on a bridge): the default and weight-sync groups form across
them, though the hostname resolves to loopback (gloo_toward). Needs root and ip netns.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from areal_like.net.auth import ENGINE_KEY_ENV
from tests.conftest import child_env, stop_process

TIMEOUT_S = 60.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[tuple[list[str], list[str]]]:
    """(namespaces, addresses) of three hosts on one /24; host 0 holds the bridge, veths join."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = f"al{os.getpid() % 100000}"
    names = [f"{tag}-{i}" for i in range(3)]
    net = f"10.{random.randrange(100, 250)}.{random.randrange(256)}"
    addrs = [f"{net}.{i + 1}" for i in range(3)]
    made = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        _ip("-n", names[0], "link", "add", f"{tag}-br", "type", "bridge")
        _ip("-n", names[0], "addr", "add", f"{addrs[0]}/24", "dev", f"{tag}-br")
        _ip("-n", names[0], "link", "set", f"{tag}-br", "up")
        for i, name in enumerate(names[1:], 1):
            _ip("-n", names[0], "link", "add", f"{tag}-h{i}", "type", "veth", "peer", "name",
                f"{tag}-p{i}", "netns", name)
            _ip("-n", names[0], "link", "set", f"{tag}-h{i}", "master", f"{tag}-br", "up")
            _ip("-n", name, "addr", "add", f"{addrs[i]}/24", "dev", f"{tag}-p{i}")
            _ip("-n", name, "link", "set", f"{tag}-p{i}", "up")
        for name in names:
            _ip("-n", name, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for name in made:
            _ip("netns", "del", name)
        pytest.skip(f"cannot make network namespaces here: {e}")
    try:
        yield names, addrs
    finally:
        for name in names:
            _ip("netns", "del", name)


def _on_each(names: list[str], code: str, extra: list[dict[str, str]]) -> list[str]:
    """code on each host at once, host i with extra[i] in its env; their stdout (exit 0)."""
    procs = [subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", code],
                              env=child_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name, env in zip(names, extra)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


TRAINER = """
import torch, torch.distributed as dist
from areal_like.settings.config import TrainerConfig
from trainer.model import init_distributed
rank, world = init_distributed(TrainerConfig(gloo_timeout_s=20.0))
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(world, t.item())
dist.destroy_process_group()
"""


WEIGHT_GROUP = """
import os, torch, torch.distributed as dist
from areal_like.net.auth import ENGINE_KEY_ENV
from areal_like.net.distributed import destroy_weight_group, init_weight_group
rank = int(os.environ["R"])
pg = init_weight_group("gloo", os.environ["M"], int(os.environ["P"]), 3, rank, "wg-secret-name",
                       timeout_s=20.0, key=os.environ[ENGINE_KEY_ENV])
t = torch.tensor([7.0 if rank == 0 else 0.0])
dist.broadcast(t, 0, group=pg)
print(t.item())
destroy_weight_group(pg)
"""


def test_a_two_node_trainer_and_engines_on_two_other_nodes_form_their_groups(hosts, free_port):
    """torchrun's env on hosts 0 and 1 (``areal-like train --nnodes 2``): the ranks meet and
    reduce. Then rank 0 on host 0 hosts the weight group; engines on hosts 1 and 2 join, receive."""
    names, addrs = hosts
    base = {"WORLD_SIZE": "2", "MASTER_ADDR": addrs[0], "MASTER_PORT": str(free_port())}
    outs = _on_each(names[:2], TRAINER,
                    [{**base, "RANK": str(r), "LOCAL_RANK": "0"} for r in (0, 1)])
    assert [o.split() for o in outs] == [["2", "3.0"], ["2", "3.0"]]
    # the job's engine key in every node's environment, as `areal-like run` hands it out
    base = {"M": addrs[0], "P": str(free_port()), ENGINE_KEY_ENV: secrets.token_hex(16)}
    outs = _on_each(names, WEIGHT_GROUP, [{**base, "R": str(r)} for r in range(3)])
    assert [o.strip() for o in outs] == ["7.0"] * 3
