"""Rows whose every advantage is 0 are not computed (trainer/step.py trained_rows), same update;
OAPL, a KL term and a pi_prox pass compute every row. Worker: ``python ... OUT``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORKER_TIMEOUT_S = 300
MIXED = [[1.0] * 4, [0.0, 1.0, 1.0, 0.0], [0.0] * 4, [1.0, 0.0, 0.0, 0.0]]  # groups 0 and 2: A = 0
EQUAL = [[1.0] * 4, [0.0] * 4, [1.0] * 4, [0.0] * 4]
# minibatch 1: A = 0
FIRST_EQUAL = [[1.0] * 4, [0.0] * 4, [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def groups(rewards: list[list[float]], seed: int = 0):
    import numpy as np

    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    out = []
    for g, rs in enumerate(rewards):
        trajs = []
        for r in rs:
            p, t = int(rng.integers(2, 7)), int(rng.integers(1, 9))
            trajs.append(Trajectory.of(prompt_ids=rng.integers(4, 100, p),
                                       output_ids=rng.integers(4, 100, t),
                                       behav_logp=-rng.random(t) * 5,
                                       versions=np.zeros(t, np.int32),
                                       reward=r, finish_reason="stop"))
        out.append(TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g),
                                   prompt_index=g, epoch=0,
                                   trajectories=trajs))
    return out


def step(rewards: list[list[float]], overrides: list[str]) -> tuple[dict, dict, dict]:
    """(stats, weights before, weights after) of one step."""
    import torch

    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, reference_logp, train_step

    cfg = load_config(["trainer.lr=1e-2", "trainer.micro_batch_size=4", "trainer.grad_clip=1e9",
                       "trainer.weight_decay=0.1", *overrides])
    init_distributed(cfg.trainer)
    torch.manual_seed(0)
    policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(groups(rewards))
    ref = None
    if cfg.trainer.loss.kl_coef:
        ref = reference_logp(policy.model, batch, s, policy.device)
    prox = recompute_prox_logp(policy, batch, s)  # None: fused into the training pass
    try:
        before = full_state_dict(policy.model)
        stats = train_step(policy, batch, s, prox, ref)
        return stats, before, full_state_dict(policy.model)
    finally:
        leave_distributed()


def compare(rewards: list[list[float]], overrides: list[str]) -> dict:
    from trainer.data import groups_to_batch

    (on, before, w_on), (off, _, w_off) = (
        step(rewards, overrides + [f"trainer.skip_zero_advantage={flag}"])
        for flag in ("true", "false"))
    # the step's seq_tokens: the tokens of the rows it computed (a row at zero weight: none)
    b = groups_to_batch(groups(rewards))
    lens = (b.prompt_lens + b.output_lens).tolist()
    varied = [len(set(rewards[g])) > 1 for g in b.group_ids.tolist()]
    return {"tokens_on": on.get("seq_tokens", 0.0), "tokens_off": off["seq_tokens"],
            "all": sum(lens), "varied": sum(n for n, v in zip(lens, varied) if v),
            "loss": [on["loss"], off["loss"]],
            "grad_norm": [on["grad_norm"], off["grad_norm"]], "skip_frac": on["zero_adv_skip_frac"],
            "has_mismatch_kl": "mismatch_kl" in on,
            "weight_diff": max(float((w_on[k] - w_off[k]).abs().max()) for k in w_on),
            "moved": max(float((w_on[k] - before[k]).abs().max()) for k in w_on)}


def worker(out: str) -> None:
    import torch

    torch.set_num_threads(1)
    res = {kernel: compare(MIXED, [f"loss={kernel}"])
           for kernel in ("decoupled_ppo", "gspo", "vespo")}
    res["ppo_packed"] = compare(MIXED, ["loss=ppo", "trainer.loss.agg=seq-mean-token-sum",
                                        "trainer.pack_sequences=true",
                                        "trainer.pack_min_padding=0"])
    res["two_minibatches"] = compare(FIRST_EQUAL, ["loss=vespo", "trainer.num_minibatches=2"])
    res["all_equal"] = compare(EQUAL, ["loss=decoupled_ppo"])
    res["oapl"] = compare(MIXED, ["loss=oapl"])
    res["kl"] = compare(MIXED, ["loss=decoupled_ppo", "trainer.loss.kl_coef=0.1"])
    res["prox_pass"] = compare(MIXED, ["loss=decoupled_ppo", "trainer.num_minibatches=2"])
    Path(out).write_text(json.dumps(res))


def test_rows_with_zero_advantage_are_not_computed_and_the_update_is_the_same(tmp_path):
    from tests.conftest import run_json_worker

    r = run_json_worker(__file__, tmp_path / "out.json", WORKER_TIMEOUT_S)
    for kernel in ("decoupled_ppo", "gspo", "vespo", "ppo_packed", "two_minibatches"):
        k = r[kernel]
        # MIXED: groups 0 and 2 are never computed; FIRST_EQUAL: groups 0 and 1
        assert k["tokens_off"] == k["all"] and k["tokens_on"] == k["varied"] < k["all"], kernel
        assert k["skip_frac"] == 0.5 and k["has_mismatch_kl"], kernel
        assert abs(k["loss"][0] - k["loss"][1]) <= 1e-6 * max(1.0, abs(k["loss"][1])), kernel
        assert abs(k["grad_norm"][0] - k["grad_norm"][1]) <= 1e-5 * k["grad_norm"][1], kernel
        assert k["weight_diff"] <= 1e-6, kernel
        assert k["moved"] > 1e-3, kernel  # not vacuous: the step moved the weights
    e = r["all_equal"]
    assert (e["tokens_on"] == 0 and e["tokens_off"] == e["all"] and e["skip_frac"] == 1.0
            and not e["has_mismatch_kl"])
    assert e["loss"] == [0.0, 0.0] and e["grad_norm"] == [0.0, 0.0]
    assert e["weight_diff"] == 0.0 and e["moved"] > 1e-4  # weight decay moved them, alike
    for case in ("oapl", "kl", "prox_pass"):
        c = r[case]
        assert c["tokens_on"] == c["tokens_off"] == c["all"] and c["skip_frac"] == 0.0, case


def test_the_loss_share_of_the_rows_computed_follows_the_aggregation():
    import torch

    from areal_like.settings.config import load_config
    from trainer.step import loss_share

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                        dtype=torch.float32)
    trained = torch.tensor([0, 3])  # 8 of 10 tokens, 2 of 3 sequences with a token
    for agg, share in (("token-mean", 0.8), ("seq-mean-token-mean", 2 / 3),
                       ("seq-mean-token-sum", 2 / 3),
                       ("seq-mean-token-sum-norm", 1.0)):
        cfg = load_config([f"trainer.loss.agg={agg}"]).trainer.loss
        assert loss_share(cfg, mask, trained, 10.0, 3.0) == (8.0, 2.0, share), agg
        # a minibatch without a loss token (multi-turn context only) trains nothing, and no row:
        # counts floored at 1 as norms() floors them (its calls are masked), no ZeroDivisionError
        none = torch.tensor([], dtype=torch.long)
        assert loss_share(cfg, mask, none, 0.0, 0.0) == (1.0, 1.0, 1.0), agg


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(sys.argv[1])
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
