"""Routing replay (areal_like/weights/routing.py, trainer/step.py's ``output_logp``): a router
replays given experts with hand-checked weights and gradients; a tiny Qwen3-MoE's log-probs are
unchanged when it replays its own choices and follow the replayed experts otherwise."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from areal_like.settings.config import ConfigError, load_config
from areal_like.weights.routing import recording, replaying, route_shape
from launch.preflight import check_routing_replay
from tests.families import family_config, save_family
from trainer.data import TrainBatch
from trainer.model import attach_logprobs
from trainer.step import output_logp


def _router(norm: bool):
    cfg = family_config("qwen3_moe")
    cfg.norm_topk_prob = norm
    router = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():  # token e_0 gets the logits log(1, 2, 3, 4): probabilities (1,2,3,4)/10
        router.weight[:, 0] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    h = torch.zeros(1, cfg.hidden_size)
    h[0, 0] = 1.0
    return router, h


class _Holder(torch.nn.Module):  # a model as routing.py sees one: a config and its routers
    def __init__(self, router):
        super().__init__()
        self.config, self.router = type("C", (), {"num_experts_per_tok": 2})(), router


@pytest.mark.parametrize("norm, expected", [(True, [0.25, 0.75]), (False, [0.1, 0.3])])
def test_router_replays_the_given_experts(norm, expected):
    router, h = _router(norm)
    _, own_w, own_idx = router(h)
    assert own_idx.tolist() == [[3, 2]]
    assert own_w[0].tolist() == pytest.approx([4 / 7, 3 / 7] if norm else [0.4, 0.3])
    with replaying(_Holder(router), torch.tensor([[[0, 2]]])):
        _, w, idx = router(h)
        w[0, 0].backward()
    assert idx.tolist() == [[0, 2]]
    assert w[0].tolist() == pytest.approx(expected)
    # d w_0 / d logit_e: only the chosen experts' logits get a gradient
    g = router.weight.grad[:, 0].tolist()
    if norm:  # w_0 = sigmoid(l_0 - l_2): w_0 (1 - w_0) = 3/16
        assert g == pytest.approx([3 / 16, 0.0, -3 / 16, 0.0], abs=1e-6)
    else:  # w_0 = p_0: p_0 (1[e = 0] - p_e)
        assert g == pytest.approx([0.1 * 0.9, -0.02, -0.03, -0.04], abs=1e-6)
    _, w, _ = router(h)  # the router's own forward is back
    assert w[0].tolist() == pytest.approx([4 / 7, 3 / 7] if norm else [0.4, 0.3])


def _moe():
    torch.manual_seed(0)
    cfg = family_config("qwen3_moe")
    cfg.norm_topk_prob = True
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
        for layer in model.model.layers:  # sharper routers: choices that matter
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return attach_logprobs(model.eval())


def _batch(routes=None) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 104, (2, 9), generator=g)
    ids[1, 7:] = 0  # row 1: 4 prompt + 3 output tokens, right-padded
    return TrainBatch(input_ids=ids, prompt_lens=torch.tensor([4, 4]),
                      output_lens=torch.tensor([5, 3]), behav_logp=torch.zeros(2, 5),
                      mask=torch.ones(2, 5), rewards=torch.zeros(2),
                      group_ids=torch.zeros(2, dtype=torch.long),
                      head_versions=torch.zeros(1, dtype=torch.long), routes=routes)


@pytest.mark.parametrize("packed", [False, True])
def test_replaying_its_own_choices_changes_nothing_and_others_are_followed(packed):
    model = _moe()
    assert route_shape(model) == (2, 2)
    batch = _batch()
    with torch.no_grad(), recording(model) as seen:
        model(input_ids=batch.input_ids)
    own = seen[0].view(2, 9, 2, 2)
    with torch.no_grad():
        free = output_logp(model, batch, 1.0, packed=packed)
        same = output_logp(model, _batch(own), 1.0, packed=packed)
    valid = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    torch.testing.assert_close(same[valid], free[valid], rtol=0, atol=1e-6)

    # every token to experts 0 and 1; experts 2 and 3 broken: replay never reaches them
    forced = torch.tensor([0, 1]).expand(2, 9, 2, 2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[2:] = math.nan
        broken_free = output_logp(model, batch, 1.0, packed=packed)
        followed = output_logp(model, _batch(forced), 1.0, packed=packed)
    assert broken_free[valid].isnan().any()  # the routers' own choices reach expert 2 or 3
    assert followed[valid].isfinite().all()
    assert (followed[valid] - free[valid]).abs().max() > 1e-3


def test_gradients_reach_the_router_logits_under_replay():
    model = _moe().train()
    forced = torch.tensor([0, 1]).expand(2, 9, 2, 2)
    output_logp(model, _batch(forced), 1.0).sum().backward()
    gate = model.model.layers[0].mlp.gate.weight.grad
    # only experts 0 and 1 are chosen, renormalised: their logits get opposite gradients, the
    # others none (up to rounding: the softmax over all four cancels in the renormalisation)
    assert gate[:2].abs().max() > 1e-3
    torch.testing.assert_close(gate[0], -gate[1])
    assert gate[2:].abs().max() < 1e-6 * gate[:2].abs().max()


def test_routes_that_do_not_match_the_forward_are_refused():
    model = _moe()
    with pytest.raises(ValueError, match="do not match"):
        with replaying(model, torch.zeros(18, 3, 2, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="the forward has 18 tokens, the routes 5"):
        with replaying(model, torch.zeros(5, 2, 2, dtype=torch.long)):
            model(input_ids=_batch().input_ids)


def test_the_switch_is_refused_before_start_where_it_cannot_work(tmp_path):
    def why(*keys: str) -> str:
        return " ".join(check_routing_replay(load_config(list(keys))))

    assert why() == ""  # off by default
    # a dense model: route_shape's refusal, the only place that says so
    assert "no mixture-of-experts router" in why("trainer.routing_replay=true")
    moe = save_family("qwen3_moe", tmp_path / "moe")
    on = ("trainer.routing_replay=true", f"model.path={moe}")
    assert why(*on) == ""
    assert why(*on, "rollout.engine.kind=sglang") == ""  # launched with its routes returned
    for flag in ("+rollout.engine.sglang.enable_return_routed_experts=false",
                 "+rollout.engine.sglang.enable_hierarchical_cache=true"):
        assert flag[1:].split("=")[0] in why(*on, "rollout.engine.kind=sglang", flag)
    assert "rollout.engine.kind=vllm" in why(*on, "rollout.engine.kind=vllm",
                                            "rollout.pause_mode=abort")
    assert "rollout.engine.kind=url" in why(*on, "rollout.engine.kind=url",
                                           "rollout.engine.url=http://127.0.0.1:1")
    for task in ("task.env=areal_like.tasks.envs:calc",
                 "task.agent=areal_like.tasks.agents:calc_agent"):
        assert why(*on, task) == why(*on, task, "rollout.engine.kind=sglang") == ""  # multi-turn


@pytest.mark.parametrize("other", ["trainer.activation_checkpointing=true",
                                   "trainer.compile_blocks=true"])
def test_the_switch_is_refused_with_recomputed_or_compiled_blocks(other):
    with pytest.raises(ConfigError, match="trainer.routing_replay=True is invalid"):
        load_config(["trainer.routing_replay=true", other])
