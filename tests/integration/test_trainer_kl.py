"""The KL-to-reference term in real trainer steps on 1 and 2 FSDP2 ranks.

Step 0: kl_ref is 0; after an update loss - policy_loss == kl_coef * kl_ref; the reference stays
frozen (also after a resume); trainer.ref_path from an export of the policy gives KL 0; packed and
padded agree; 1 and 2 ranks agree. Worker: ``python -c RUNNER test_trainer_kl.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# cold torch + transformers imports of three processes on a loaded 2-core machine
WORKER_TIMEOUT_S = 300
KL_COEF = 0.1


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import load_tokenizer
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.data import groups_to_batch
    from trainer.export import export_hf
    from trainer.model import build_policy, build_reference, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, reference_logp, train_step

    if not out_dir.is_dir():
        raise SystemExit(f"{out_dir} is not a directory")
    settings = ["trainer.lr=1e-2", "trainer.micro_batch_size=2", f"trainer.loss.kl_coef={KL_COEF}",
                "trainer.loss.agg=token-mean"]
    # the tiny model's recipe pads
    cfg = load_config([*settings, "trainer.pack_sequences=true", "trainer.pack_min_padding=0"])
    rank, _ = init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    reference = build_reference(cfg.model, cfg.trainer)
    init = full_state_dict(policy.model)
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(synthetic_groups())

    def step(ref_model):
        return train_step(policy, batch, s, recompute_prox_logp(policy, batch, s),
                          reference_logp(ref_model, batch, s, policy.device))

    res = {"step0": step(reference), "step1": step(reference),
           "ref_frozen": (all(not p.requires_grad for p in reference.parameters())
                          and not reference.training),
           "ref_state": full_state_dict(reference), "init": init,
           "policy": full_state_dict(policy.model)}
    # resume: a fresh policy loads it, the reference does not
    ckpt = save_checkpoint(out_dir / "ckpt", policy, 2)
    resumed = build_policy(cfg.model, cfg.trainer)
    load_checkpoint(ckpt, resumed)
    res["resumed_policy"] = full_state_dict(resumed.model)
    res["resumed_ref"] = full_state_dict(build_reference(cfg.model, cfg.trainer))
    hf = export_hf(policy.model, out_dir / "hf", model_cfg=cfg.model,
                   tokenizer=load_tokenizer(cfg.model),
                   shard_mb=1, dtype="float32")
    cfg.trainer.ref_path = str(hf)
    from_dir = build_reference(cfg.model, cfg.trainer)
    res["ref_path_state"] = full_state_dict(from_dir)
    res["ref_path_step"] = step(from_dir)  # policy == this reference at the start of the step
    # the same two steps with right-padded micro-batches: packing must not change the KL term
    padded_cfg = load_config([*settings, "trainer.pack_sequences=false"])
    padded = build_policy(padded_cfg.model, padded_cfg.trainer)
    padded_ref, ps = (build_reference(padded_cfg.model, padded_cfg.trainer),
                      StepSettings.from_config(padded_cfg))
    for _ in range(2):
        res["padded_step1"] = train_step(padded, batch, ps, recompute_prox_logp(padded, batch, ps),
                                         reference_logp(padded_ref, batch, ps, padded.device))
    res["padded_policy"] = full_state_dict(padded.model)
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


def test_kl_reference_step_on_one_and_two_ranks(tmp_path, spawn_python, free_port):
    import torch

    one, two = spawn_python.one_and_two_ranks(RUNNER, __file__, tmp_path, free_port(),
                                              WORKER_TIMEOUT_S)
    one, two = torch.load(one / "res.pt"), torch.load(two / "res.pt")
    for res in (one, two):
        s0, s1 = res["step0"], res["step1"]
        # policy == reference: exactly 0
        assert s0["kl_ref"] == 0.0 and s0["loss"] == s0["policy_loss"]
        assert s1["kl_ref"] > 1e-6
        assert s1["loss"] - s1["policy_loss"] == pytest.approx(KL_COEF * s1["kl_ref"], rel=1e-4)
        assert res["ref_frozen"]
        moved = max(float((w - res["init"][k]).abs().max()) for k, w in res["policy"].items())
        assert moved > 1e-3  # the policy did move away from the reference
        for key, w in res["init"].items():
            assert torch.equal(res["ref_state"][key], w), key  # two steps later: untouched
            # after a resume: still the initial weights
            assert torch.equal(res["resumed_ref"][key], w), key
            assert torch.equal(res["resumed_policy"][key], res["policy"][key]), key
            # trainer.ref_path
            assert torch.equal(res["ref_path_state"][key], res["policy"][key]), key
        assert res["ref_path_step"]["kl_ref"] == 0.0
        for key in ("loss", "policy_loss", "kl_ref"):  # packed and right-padded micro-batches agree
            assert res["padded_step1"][key] == pytest.approx(res["step1"][key],
                                                             rel=1e-5, abs=1e-7), key
        for key, w in res["policy"].items():
            # Adam's first steps move each weight by about lr = 1e-2 whatever its gradient's size:
            # summation-order noise in a near-zero gradient shows as up to 1e-5 here
            torch.testing.assert_close(res["padded_policy"][key], w, rtol=0, atol=1e-4)
    for key in ("loss", "policy_loss", "kl_ref"):  # ranks do not change the numbers
        assert two["step1"][key] == pytest.approx(one["step1"][key], rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
