"""Routing-replay routes are checked at admission: experts 4, -5, 1e6 or a wrong top-k width on a
tiny Qwen3-MoE are refused as bad_routes (counted, not stored, re-issued); valid routes pass; the
shape read is the trainer model's.
"""

from __future__ import annotations

import numpy as np
from test_buffer_service import make_cfg, register, running

from areal_like.job_facts import model_routes
from areal_like.settings.config import ModelConfig, TrainerConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from tests.families import save_family

LAYERS, TOP_K, EXPERTS = 2, 2, 4
PROMPT, OUTPUT = 2, 4


def _group(credit: P.Credit, expert: int | None = None, top_k: int = TOP_K) -> P.TrajectoryGroup:
    """Two trajectories with routes; expert put at one position of the second's."""
    trajs = []
    for r in (0.0, 1.0):
        routes = np.tile(np.arange(top_k, dtype=np.int32) % EXPERTS,
                         (PROMPT + OUTPUT - 1, LAYERS, 1))
        if expert is not None and r:
            routes[2, 1, 0] = expert
        trajs.append(Trajectory.of(prompt_ids=as_i32([7, 8]), output_ids=as_i32(np.arange(OUTPUT)),
                                   behav_logp=as_f32(np.full(OUTPUT, -1.0)),
                                   versions=as_i32(np.zeros(OUTPUT)), reward=r,
                                   finish_reason="stop", routed_experts=routes))
    return P.TrajectoryGroup(group_id=f"s0-{credit.lease_id}", server_id="s0",
                             lease_id=credit.lease_id, prompt_index=credit.prompt_index,
                             epoch=credit.epoch, trajectories=trajs)


def test_the_buffer_refuses_routes_naming_experts_the_model_lacks(tmp_path):
    from transformers import AutoModelForCausalLM

    from areal_like.weights.routing import route_shape

    moe = save_family("qwen3_moe", tmp_path / "moe")
    cfg = make_cfg(tmp_path / "run", max_staleness=3)
    cfg.model = ModelConfig(path=str(moe))
    cfg.trainer = TrainerConfig(routing_replay=True)
    assert model_routes(cfg) == (LAYERS, TOP_K, EXPERTS)
    model = AutoModelForCausalLM.from_pretrained(str(moe))
    assert route_shape(model) == (LAYERS, TOP_K)  # the trainer's model agrees with the facts
    with running(cfg) as (_svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=5)).credits
        for credit, expert in zip(credits, (4, -5, 1_000_000)):
            ack = c.request(_group(credit, expert))
            assert ack.status == "rejected", ack
            assert ack.reason == (f"bad_routes: trajectory 1 routes to expert {expert}, outside "
                                  f"[0, {EXPERTS}) (the model's num_experts)"), ack.reason
        ack = c.request(_group(credits[3], top_k=3))
        assert ack.status == "rejected" and ack.reason.startswith(
            f"bad_routes: trajectory 0 has {(PROMPT + OUTPUT - 1) * LAYERS * 3} routed_experts, "
            f"not [{PROMPT + OUTPUT - 1} positions, {LAYERS} layers, top_k {TOP_K}]"), ack
        assert c.request(_group(credits[4], EXPERTS - 1)).status == "accepted"
        s = c.request(P.StatsRequest()).values
        assert s["rejected_bad_routes"] == 4 and s["groups_accepted"] == 1 and s["stored"] == 1
        assert (s["in_flight"], s["reissue_queue"]) == (0, 4)  # the engine's doing: re-generated
