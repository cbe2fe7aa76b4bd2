"""The fixed cost of a one-rank step: one minibatch fuses pi_prox into the step with exactly the
unfused update; two minibatches recompute (refused without, naming trainer.num_minibatches); a
world of one in fp32 is not FSDP-sharded; and it computes in ``model.dtype`` (bf16 too: a world of
one used to be left unsharded, and only FSDP2's mixed-precision policy casts, so it trained in fp32
whatever ``model.dtype`` said) with fp32 master weights. Worker: ``python
test_trainer_fused_prox.py OUT``.
"""

from __future__ import annotations

import json
import math
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

    def dtypes_step(policy, s, prox) -> tuple[dict, dict]:
        """train_step; the dtypes of q_proj's input and weight in the training forward, and of
        the parameters, gradients and AdamW moments after it."""
        seen = set()
        hook = policy.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda mod, args: torch.is_grad_enabled()
            and seen.add((str(args[0].dtype), str(mod.weight.dtype))))
        stats = train_step(policy, batch, s, prox)
        hook.remove()
        ps = list(policy.model.parameters())
        return stats, {"compute": sorted(seen), "params": sorted({str(p.dtype) for p in ps}),
                       "grads": sorted({str(p.grad.dtype) for p in ps if p.grad is not None}),
                       "adam": sorted({str(v.dtype) for st in policy.optimizer.state.values()
                                       for k, v in st.items() if k != "step"})}

    for name in ("bf16", "fused", "recomputed"):
        dtype = "bfloat16" if name == "bf16" else "float32"
        cfg = load_config(["trainer.lr=1e-2", "trainer.micro_batch_size=4", "trainer.grad_clip=1e9",
                           "loss=decoupled_ppo", f"model.dtype={dtype}"])
        init_distributed(cfg.trainer)
        torch.manual_seed(0)
        policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
        s = StepSettings.from_config(cfg)
        init = full_state_dict(policy.model)
        res[f"{name}_fuse_prox"], res[f"{name}_recompute_is_none"] = (
            s.fuse_prox, recompute_prox_logp(policy, batch, s) is None)
        res[f"{name}_dtensor"] = any(isinstance(p, DTensor) for p in policy.model.parameters())
        prox = None if name == "fused" else batch_logp(policy.model, batch, s, policy.device)
        stats, res[f"{name}_dtypes"] = dtypes_step(policy, s, prox)
        runs[name] = (stats, full_state_dict(policy.model), init)
    bs, bw, binit = runs.pop("bf16")
    res["bf16_loss"] = bs["loss"]
    res["bf16_moved"] = max(float((bw[k] - binit[k]).abs().max()) for k in bw)
    (fs, fw, init), (rs, rw, _) = runs["fused"], runs["recomputed"]
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


def test_one_rank_fuses_prox_exactly_is_unsharded_and_computes_in_model_dtype(tmp_path):
    from tests.conftest import run_json_worker

    r = run_json_worker(__file__, tmp_path / "out.json", WORKER_TIMEOUT_S)
    assert r["fused_fuse_prox"] and r["fused_recompute_is_none"]
    assert r["loss"][0] == r["loss"][1]
    assert r["grad_norm"][0] == r["grad_norm"][1]
    assert r["max_weight_diff"] == 0.0
    assert r["moved"] > 1e-3  # not vacuous: the step moved the weights far more than any rounding
    assert not r["fused_dtensor"]
    assert not r["two_mb_fuse"] and r["two_mb_recompute_shape"] == [16, 8]
    assert "trainer.num_minibatches=2" in r["two_mb_error"]
    for dtype in ("float32", "bfloat16"):
        got = r["bf16_dtypes" if dtype == "bfloat16" else "fused_dtypes"]
        assert got["compute"] == [[f"torch.{dtype}"] * 2], got  # the Linear's input and weight
        assert got["params"] == got["grads"] == got["adam"] == ["torch.float32"], got  # masters
    assert r["bf16_moved"] > 1e-5 and math.isfinite(r["bf16_loss"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(sys.argv[1])
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
