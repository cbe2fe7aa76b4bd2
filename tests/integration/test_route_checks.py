"""Routing-replay routes are checked at the buffer's admission (areal_like/wire/group_checks.py).

A tiny Qwen3-MoE (2 mixture layers, top-2 of 4 experts) is saved as a user's checkpoint; a buffer
of a job with ``trainer.routing_replay=true`` on it runs over real sockets and a member sends it
groups whose routes name experts 4, -5 and 1,000,000, and one whose routes have the wrong top-k
width. Each is refused with the reason ``bad_routes`` naming the model's numbers, counted in
``buffer/rejected{reason="bad_routes"}``, nothing of it is stored, and its prompt goes out again;
a group whose routes name the model's experts is accepted. The shape the buffer reads from the
config.json is the one the trainer's model has (``route_shape``).

Mutation checked: without ``routes_problem`` every bad group was accepted (seen failing).
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
    """Two trajectories with routes [prompt + output - 1, LAYERS, top_k]; ``expert`` put at one
    position of the second one's."""
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
