"""Expert parallelism: a tiny Qwen3-MoE step on 2 gloo ranks with EP=2 equals one rank without.

Asserted: 4 of 8 experts per EP rank; loss, grad norm, expert load and parameters equal (1e-5);
pushed tensors are the unsplit model's; the EP=2 checkpoint resumes under EP=1 bit for bit; the
export gives the trained log-probs. Workers: ``python -c RUNNER test_expert_parallel.py OUT_DIR``.
Not vacuous: dropping the 1/N grad scale, or returning outputs in expert order, fails it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 300  # cold torch + transformers imports of three processes on 2 loaded cores
EXPERTS = 8
IDS = [[1, 5, 9, 30, 41, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def settings(model_dir: Path, expert_parallel: int) -> list[str]:
    return [f"model.path={model_dir}", "trainer.lr=1e-2", "trainer.grad_clip=1e9",
            "trainer.micro_batch_size=2", f"trainer.expert_parallel={expert_parallel}"]


def next_token_logp(logits: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor(IDS)
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import load_tokenizer
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import save_checkpoint
    from trainer.data import groups_to_batch
    from trainer.export import export_hf
    from trainer.model import build_policy, evaluating, init_distributed, leave_distributed
    from trainer.ranks import local
    from trainer.step import StepSettings, recompute_prox_logp, train_step
    from trainer.weight_buckets import PushTensors, gather
    from trainer.weight_sync import push_buckets

    cfg = load_config(settings(out_dir.parent / "hf", int(os.environ.get("WORLD_SIZE", "1"))))
    rank, _ = init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
    res = {"local_experts": [local(m.mlp.experts.gate_up_proj).shape[0]
                             for m in policy.model.model.layers],
           "init": full_state_dict(policy.model)}
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(synthetic_groups())
    res["stats"] = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    res["state"] = full_state_dict(policy.model)
    push = PushTensors(policy.model)
    res["pushed"] = {name: t for b in push_buckets(push, "float32", bucket_mb=0.02)
                     for name, t in zip(b.names, gather(push, b, "float32"))}
    with torch.no_grad(), evaluating(policy.model):
        res["logp"] = next_token_logp(policy.model(torch.tensor(IDS)).logits)
    save_checkpoint(out_dir / "ckpt", policy, 1)
    export_hf(policy.model, out_dir / "export", model_cfg=cfg.model,
              tokenizer=load_tokenizer(cfg.model), shard_mb=1, dtype="float32")
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


def resumed_state(checkpoint: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """The parameters of a one-rank, EP=1 policy resumed from ``checkpoint`` (this process)."""
    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint
    from trainer.model import build_policy, init_distributed, leave_distributed

    cfg = load_config(settings(model_dir, 1))
    init_distributed(cfg.trainer)
    try:
        policy = build_policy(cfg.model, cfg.trainer)
        assert load_checkpoint(checkpoint, policy)[0] == 1
        return full_state_dict(policy.model)
    finally:
        leave_distributed()


@pytest.mark.timeout(WORKER_TIMEOUT_S + 120)
def test_two_expert_parallel_ranks_train_checkpoint_export_and_push_as_one_rank(
        tmp_path, spawn_python, free_port):
    from transformers import AutoModelForCausalLM

    from tests.families import save_family

    model_dir = save_family("qwen3_moe", tmp_path / "hf", num_experts=EXPERTS)
    one, two = (torch.load(d / "res.pt") for d in spawn_python.one_and_two_ranks(
        RUNNER, __file__, tmp_path, free_port(), WORKER_TIMEOUT_S))
    assert one["local_experts"] == [EXPERTS, EXPERTS]
    assert two["local_experts"] == [EXPERTS // 2, EXPERTS // 2]  # each rank: 4 of the 8
    for key in ("loss", "grad_norm"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5), key
    # the load counts the tokens each layout computes (its padding too): close, not equal
    load = one["stats"]["moe_expert_load_max"]
    assert 1.0 < load and two["stats"]["moe_expert_load_max"] == pytest.approx(load, rel=0.05)
    experts = [k for k in one["state"] if ".experts." in k]
    assert len(experts) == 4
    for k, w in one["state"].items():
        torch.testing.assert_close(two["state"][k], w, rtol=1e-5, atol=1e-6, msg=k)
    # not vacuous: the step moved the experts by far more than the tolerance
    assert min(float((one["state"][k] - one["init"][k]).abs().max()) for k in experts) > 1e-3
    # the push: whole experts, one tensor per expert, under the one-rank run's names
    assert two["pushed"].keys() == one["pushed"].keys()
    assert sum(".experts.7." in n for n in two["pushed"]) == 2 * 3  # 2 layers x gate, up, down
    for name, t in one["pushed"].items():
        torch.testing.assert_close(two["pushed"][name], t, rtol=1e-5, atol=1e-6, msg=name)
    # the EP=2 checkpoint resumes under EP=1, bit for bit
    resumed = resumed_state(tmp_path / "two" / "ckpt" / "v00000001", model_dir)
    assert all(torch.equal(resumed[k], w) for k, w in two["state"].items())
    # the EP=2 export loads in transformers with the trained model's log-probs
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "export"))
    with torch.no_grad():
        logp = next_token_logp(exported(torch.tensor(IDS)).logits)
    torch.testing.assert_close(logp, two["logp"], rtol=0, atol=1e-5)


def test_an_expert_parallel_that_cannot_split_the_model_is_refused_before_start(tmp_path):
    from areal_like.settings.config import ConfigError, load_config
    from launch.preflight import PreflightError, checked
    from tests.families import save_family
    from trainer.model import build_policy, build_reference, init_distributed, leave_distributed

    moe = save_family("qwen3_moe", tmp_path / "moe", num_experts=EXPERTS)
    dense = save_family("qwen3", tmp_path / "dense")
    # at config load, where the trainer's ranks are given
    with pytest.raises(ConfigError, match=r"trainer.expert_parallel=4 is invalid: must be a "
                       r"divisor of launch.trainer_ranks=2"):
        load_config(["trainer.expert_parallel=4", "launch.trainer_ranks=2"])
    with pytest.raises(ConfigError, match=r"trainer.expert_parallel=2 is invalid: must be 1 with "
                       r"trainer.compile_blocks"):
        load_config(["trainer.expert_parallel=2", "trainer.compile_blocks=true"])
    # at preflight, what the model says
    for path, n, why in ((moe, 3, "does not divide the model's num_experts=8"),
                         (dense, 2, "Qwen3ForCausalLM is not a mixture of experts whose")):
        with pytest.raises(PreflightError, match=f"trainer.expert_parallel={n}:? {why}"):
            checked(load_config(["model=local_hf", f"model.path={path}",
                                 f"trainer.expert_parallel={n}"]))
    assert checked(load_config(["model=local_hf", f"model.path={moe}",
                                "trainer.expert_parallel=2"]))
    # the trainer itself, on ranks counted from the cores (launch.trainer_ranks null): one here
    cfg = load_config([f"model.path={moe}", "trainer.expert_parallel=2"])
    init_distributed(cfg.trainer)
    try:
        with pytest.raises(ValueError, match=r"trainer.expert_parallel=2 does not divide the "
                           r"trainer's ranks on a node \(1, launch.trainer_ranks\); use a "
                           r"divisor of both 8 and 1"):
            build_policy(cfg.model, cfg.trainer)
        # a dense KL reference beside the mixture is built without EP
        ref = load_config([f"model.path={moe}", "trainer.expert_parallel=2",
                           f"trainer.ref_path={dense}"])
        assert type(build_reference(ref.model, ref.trainer)).__name__ == "Qwen3ForCausalLM"
    finally:
        leave_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    exit_process(0)  # as the trainer exits (tests/integration/test_trainer_meta_init.py)
