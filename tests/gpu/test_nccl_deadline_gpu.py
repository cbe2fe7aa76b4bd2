"""The NCCL weight-sync deadline holds on one GPU (marker gpu; skipped without CUDA).

A member lost between the rendezvous and its first receive: rank 1 joins the NCCL weight group
(``init_weight_group``) and then never issues an op, so the communicator, created lazily at the
first op, never forms. Rank 0 starts as the trainer does (``set_nccl_nonblocking_timeout`` from
the deadline before any NCCL call) and broadcasts under the trainer's guards (``watchdog`` and
``wait_work``, trainer/weight_group.py). Its broadcast must fail within about the deadline, not
after torch's default 30 minutes (trainer/WEIGHT_SYNC.md; areal_like/net/distributed.py says why).
Both ranks on GPU 0 is allowed here: NCCL refuses two ranks on one device only when both create
the communicator, and rank 1 never does.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 20.0

MEMBER = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[1])
import torch
from areal_like.net.distributed import init_weight_group
torch.cuda.set_device(0)
pg = init_weight_group("nccl", "127.0.0.1", int(sys.argv[2]), 2, 1, sys.argv[3], timeout_s=600,
                       key=os.environ["AREAL_LIKE_ENGINE_API_KEY"])
print("JOINED", flush=True)
threading.Event().wait()  # never issues an op; the test stops this process
"""

RANK0 = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from areal_like.net.distributed import init_weight_group, set_nccl_nonblocking_timeout
deadline_s = float(sys.argv[4])
set_nccl_nonblocking_timeout(deadline_s)  # as trainer/model.py init_distributed, before any group
import torch
import torch.distributed as dist
from trainer.weight_group import wait_work, watchdog
torch.cuda.set_device(0)
pg = init_weight_group("nccl", "127.0.0.1", int(sys.argv[2]), 2, 0, sys.argv[3],
                       timeout_s=deadline_s, key=os.environ["AREAL_LIKE_ENGINE_API_KEY"])
print("HOSTED", flush=True)
sys.stdin.readline()  # the member has joined
t = torch.ones(1 << 20, device="cuda")
t0 = time.monotonic()
error = None
try:
    with watchdog(pg.abort, t0 + deadline_s):
        work = dist.broadcast(t, src=0, group=pg, async_op=True)
        wait_work(work, t0 + deadline_s, "nccl", lambda: None)
except Exception as e:
    error = f"{type(e).__name__}: {e}"[:300]
print("RESULT " + json.dumps({"elapsed_s": time.monotonic() - t0, "error": error}), flush=True)
os._exit(0)  # nothing to tear down cleanly: the communicator never formed
"""


def _line(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line; stderr:\n{proc.stderr.read()[-4000:]}")


def test_a_member_that_never_receives_cannot_hold_rank_0_past_its_deadline(figure, free_port):
    from tests.conftest import child_env, stop_process

    port, name = free_port(), "deadline-test-group"
    # the job's engine key in both ranks' environment, as `areal-like run` hands it out
    env = child_env({"AREAL_LIKE_ENGINE_API_KEY": secrets.token_hex(16)})
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    args = [str(REPO), str(port), name]
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, *args, str(DEADLINE_S)],
                             stdin=subprocess.PIPE,
                             **pipes)
    member = None
    try:
        _line(rank0, "HOSTED")
        member = subprocess.Popen([sys.executable, "-c", MEMBER, *args], **pipes)
        _line(member, "JOINED")
        rank0.stdin.write("go\n")
        rank0.stdin.flush()
        out, _ = rank0.communicate(timeout=10 * DEADLINE_S)  # 30 minutes is what must not happen
        res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        figure("nccl_lost_member_return_s", res["elapsed_s"], "s")
        assert res["error"] is not None, "the broadcast completed without its only peer"
        assert res["elapsed_s"] < DEADLINE_S + 10, res
    finally:
        for proc in (rank0, member):
            if proc is not None:
                stop_process(proc)
