"""A batch whose step raises (a route to expert 1e6) is quarantined: recorded, skipped, acked in
the next request, and the job finishes with exit 0 counting it; on 2 ranks both skip in step.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from areal_like.net.transport import Server
from areal_like.settings.config import load_config, to_yaml
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from tests.families import save_family

TRAINER_S = 300  # a daemon imports torch and builds its model; the shared 2-core machine is slow
LAYERS, TOP_K, OUTPUT = 2, 2, 4
POISON = 1_000_000


def _groups(tag: str, version: int, poison: bool, everywhere: bool) -> list[P.TrajectoryGroup]:
    out = []
    for g in range(2):
        trajs = []
        for r in (0.0, 1.0):
            routes = np.tile(np.arange(TOP_K, dtype=np.int32), (2 + OUTPUT - 1, LAYERS, 1))
            if poison and (everywhere or (g == 1 and r)):
                routes[2, 1, 0] = POISON
            trajs.append(Trajectory.of(
                prompt_ids=as_i32([5, 6]), output_ids=as_i32(np.arange(10, 10 + OUTPUT)),
                behav_logp=as_f32(np.full(OUTPUT, -1.0)), versions=as_i32(np.full(OUTPUT, version)),
                reward=r, finish_reason="stop", routed_experts=routes))
        out.append(P.TrajectoryGroup(group_id=f"{tag}-g{g}", server_id="s0", lease_id=f"{tag}-{g}",
                                     prompt_index=g, epoch=0, trajectories=trajs))
    return out


class StandIn:
    """Buffer stand-in: first batch poisoned, later clean; keeps each ack_batch."""

    def __init__(self, address: str, everywhere: bool):
        self.server, self.stop = Server(address), threading.Event()
        self.everywhere = everywhere
        self.acks: list[str] = []
        self.handed = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, m):
        if isinstance(m, P.BatchRequest):
            self.acks.append(m.ack_batch)
            tag = "poison" if self.handed == 0 else f"clean{self.handed}"
            self.handed += 1
            return P.Batch(groups=_groups(tag, m.trainer_version, tag == "poison",
                                          self.everywhere),
                           trainer_version=m.trainer_version, batch_id=tag)
        if isinstance(m, P.RosterRequest):
            return P.Roster(members=[], policy_version=0)
        return P.Ack(ref="", status="ok")

    def _serve(self) -> None:
        while not self.stop.is_set():
            if (got := self.server.recv(0.1)) is not None:
                peer, req_id, m = got
                self.server.send(peer, req_id, self._reply(m))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_batch_whose_step_raises_is_quarantined_and_the_job_finishes(tmp_path, spawn_python,
                                                                      free_port, ranks):
    moe = save_family("qwen3_moe", tmp_path / "moe")
    address = f"tcp://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    cfg = load_config([f"run_dir={run_dir}", "security.curve=false", f"buffer.address={address}",
                       f"model.path={moe}", "trainer.routing_replay=true", "trainer.steps=2",
                       "buffer.groups_per_step=2", "trainer.micro_batch_size=4",
                       "trainer.logprob_guard_tol=0", "trainer.batch_wait_s=1",
                       "trainer.first_engine_wait_s=0"])
    run_dir.mkdir()
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    buffer = StandIn(address, everywhere=ranks > 1)
    master = str(free_port())
    try:
        procs = [spawn_python("trainer", ["--config-file", cfg_path], env={
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master}) for r in range(ranks)]
        errs = [p.communicate(timeout=TRAINER_S)[1] for p in procs]
    finally:
        buffer.close()
    err = errs[0]  # rank 0: it logs the quarantine
    assert [p.returncode for p in procs] == [0] * ranks, [e[-3000:] for e in errs]
    # the poisoned batch was acknowledged by the request after it: never handed out again
    assert buffer.acks[:3] == ["", "poison", "clean1"], buffer.acks
    rows = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").open()]
    quarantined = [r for r in rows if r.get("event") == "quarantined"]
    assert len(quarantined) == 1, quarantined
    q = quarantined[0]
    assert q["groups"] == ["poison-g0", "poison-g1"] and q["policy_version"] == 0, q
    assert "out of bounds" in q["error"] and str(POISON) in q["error"], q
    assert [r["step"] for r in rows if "step" in r] == [1, 2]  # the clean batches trained
    done = [r for r in rows if r.get("event") == "done"]
    assert done and done[-1]["batches_quarantined"] == 1 and done[-1]["steps_trained"] == 2
    said = [line for line in err.splitlines() if "quarantined" in line and " ERROR " in line]
    assert said, err[-3000:]
