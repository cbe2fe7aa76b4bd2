"""The fixed cost of a one-rank step: one minibatch fuses pi_prox into the step with exactly the
unfused update; two minibatches recompute (refused without, naming trainer.num_minibatches); a
world of one in fp32 is not FSDP-sharded. Worker: ``python test_trainer_fused_prox.py OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORKER_TIMEOUT_S = 240


def worker(out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from test_trainer_invariance import synthetic_groups
    from torch.distributed.tensor import DTensor

    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, batch_logp, recompute_prox_logp, train_step

    batch = groups_to_batch(synthetic_groups())
    res: dict = {}
    runs = {}
    for name in ("fused", "recomputed"):
        cfg = load_config(["trainer.lr=1e-2", "trainer.micro_batch_size=4", "trainer.grad_clip=1e9",
                           "loss=decoupled_ppo"])
        init_distributed(cfg.trainer)
        torch.manual_seed(0)
        policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
        s = StepSettings.from_config(cfg)
        init = full_state_dict(policy.model)
        res["fuse_prox"], res["recompute_is_none"] = (
            s.fuse_prox, recompute_prox_logp(policy, batch, s) is None)
        res["dtensor_params"] = any(isinstance(p, DTensor) for p in policy.model.parameters())
        prox = None if name == "fused" else batch_logp(policy.model, batch, s, policy.device)
        stats = train_step(policy, batch, s, prox)
        runs[name] = (stats, full_state_dict(policy.model))
    (fs, fw), (rs, rw) = runs["fused"], runs["recomputed"]
    res["loss"] = [fs["loss"], rs["loss"]]
    res["grad_norm"] = [fs["grad_norm"], rs["grad_norm"]]
    res["max_weight_diff"] = max(float((fw[k] - rw[k]).abs().max()) for k in fw)
    res["moved"] = max(float((fw[k] - init[k]).abs().max()) for k in fw)
    cfg2 = load_config(["trainer.micro_batch_size=4", "loss=decoupled_ppo",
                        "trainer.num_minibatches=2"])
    s2 = StepSettings.from_config(cfg2)
    res["two_mb_fuse"] = s2.fuse_prox
    res["two_mb_recompute_shape"] = list(recompute_prox_logp(policy, batch, s2).shape)
    try:
        train_step(policy, batch, s2, None)
        res["two_mb_error"] = ""
    except ValueError as e:
        res["two_mb_error"] = str(e)
    Path(out).write_text(json.dumps(res))
    leave_distributed()


def test_fused_prox_equals_recomputed_prox_and_one_rank_is_unsharded(tmp_path):
    from tests.conftest import run_json_worker

    r = run_json_worker(__file__, tmp_path / "out.json", WORKER_TIMEOUT_S)
    assert r["fuse_prox"] and r["recompute_is_none"]
    assert r["loss"][0] == r["loss"][1]
    assert r["grad_norm"][0] == r["grad_norm"][1]
    assert r["max_weight_diff"] == 0.0
    assert r["moved"] > 1e-3  # not vacuous: the step moved the weights far more than any rounding
    assert not r["dtensor_params"]
    assert not r["two_mb_fuse"] and r["two_mb_recompute_shape"] == [16, 8]
    assert "trainer.num_minibatches=2" in r["two_mb_error"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(sys.argv[1])
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
