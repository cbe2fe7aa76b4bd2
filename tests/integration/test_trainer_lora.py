"""LoRA in real trainer steps on 1 and 2 FSDP2 ranks (gloo, real processes); workers run as
``python -c RUNNER test_trainer_lora.py OUT_DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 300  # cold torch + transformers imports of three processes on a loaded 2-core
KL_COEF = 0.1
SETTINGS = ["trainer.lr=1e-2", "trainer.micro_batch_size=2", f"trainer.loss.kl_coef={KL_COEF}",
            "trainer.loss.agg=token-mean", "trainer.lora.rank=4", "trainer.lora.alpha=8"]
# quickstart_lora's targets: the decoder's linear layers and the output head
WITH_LM_HEAD = ("trainer.lora.target_modules="
                "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]")


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import load_tokenizer
    from areal_like.weights.lora import base_name, is_adapter
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.data import groups_to_batch
    from trainer.export import export_hf
    from trainer.model import build_policy, build_reference, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, reference_logp, train_step

    cfg = load_config(SETTINGS)
    rank, _ = init_distributed(cfg.trainer)
    plain = full_state_dict(build_policy(cfg.model, load_config(SETTINGS[:-2]).trainer).model)
    policy = build_policy(cfg.model, cfg.trainer)
    reference = build_reference(cfg.model, cfg.trainer, policy)
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(synthetic_groups())

    def step(p):
        ref = build_reference(cfg.model, cfg.trainer, p)
        return train_step(p, batch, s, recompute_prox_logp(p, batch, s),
                          reference_logp(ref, batch, s, p.device))

    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    in_adam = {id(p) for g in policy.optimizer.param_groups for p in g["params"]}
    res = {"trainable": trainable, "plain": plain, "init": full_state_dict(policy.model),
           "adam_is_trainable": in_adam == {id(p) for p in policy.model.parameters()
                                            if p.requires_grad},
           "same_model": reference is policy.model}
    res["step0"], res["step1"] = step(policy), step(policy)
    res["policy"] = full_state_dict(policy.model)
    ckpt = save_checkpoint(out_dir / "ckpt", policy, 2)
    resumed = build_policy(cfg.model, cfg.trainer)
    load_checkpoint(ckpt, resumed)
    res["step2"], res["resumed_step2"] = step(policy), step(resumed)
    res["after"] = full_state_dict(policy.model)
    res["resumed_after"] = full_state_dict(resumed.model)
    res["base_names"] = {n: base_name(n) for n in res["init"] if not is_adapter(n)}
    export_hf(policy.model, out_dir / "export", model_cfg=cfg.model,
              tokenizer=load_tokenizer(cfg.model), shard_mb=1, dtype="float32", merged=True)
    for dtype in ("float32", "bfloat16"):  # model.dtype=bfloat16: FSDP2 mixed precision
        cfg = load_config([*SETTINGS, f"model.dtype={dtype}", WITH_LM_HEAD])
        p, s = build_policy(cfg.model, cfg.trainer), StepSettings.from_config(cfg)
        init = full_state_dict(p.model)
        # the KL reference first: the model's first forward runs with its adapters off
        steps = [train_step(p, batch, s, recompute_prox_logp(p, batch, s),
                            reference_logp(p.model, batch, s, p.device))
                 for _ in range(2)]
        res[dtype] = {"steps": steps, "init": init, "after": full_state_dict(p.model),
                      "trainable": {n for n, q in p.model.named_parameters() if q.requires_grad}}
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


def test_lora_trains_adapters_only_on_one_and_two_ranks_in_fp32_and_bf16(tmp_path, spawn_python,
                                                                          free_port):
    import torch

    one, two = spawn_python.one_and_two_ranks(RUNNER, __file__, tmp_path, free_port(),
                                              WORKER_TIMEOUT_S)
    one, two = torch.load(one / "res.pt"), torch.load(two / "res.pt")
    for res in (one, two):
        assert res["trainable"] and all(".lora_A." in n or ".lora_B." in n
                                        for n in res["trainable"])
        assert res["adam_is_trainable"] and res["same_model"]
        for name, hf in res["base_names"].items():  # the frozen base is the plain model's init
            assert torch.equal(res["init"][name], res["plain"][hf]), name
        assert res["step0"]["kl_ref"] == 0.0  # B = 0: the adapted model is its base
        assert res["step1"]["kl_ref"] > 1e-6
        for name, w in res["init"].items():
            if name in res["trainable"]:
                continue
            assert torch.equal(res["policy"][name], w), name  # the base never moves
            assert torch.equal(res["after"][name], w), name
        moved = max(float((res["policy"][n] - res["init"][n]).abs().max())
                    for n in res["trainable"])
        assert moved > 1e-3
        for name, w in res["after"].items():  # the same next step after a resume: adapters, AdamW
            torch.testing.assert_close(res["resumed_after"][name], w, rtol=0, atol=1e-6)
        assert res["resumed_step2"]["loss"] == pytest.approx(res["step2"]["loss"], rel=1e-6)
    for key in ("loss", "policy_loss", "kl_ref"):  # ranks do not change the numbers
        assert two["step1"][key] == pytest.approx(one["step1"][key], rel=1e-5, abs=1e-7), key
    for res in (one, two):  # bf16: adapters train, the base stays, fp32 numbers within bf16
        bf16, fp32 = res["bfloat16"], res["float32"]
        assert bf16["trainable"] == fp32["trainable"]
        assert any(n.startswith("lm_head.lora_A") for n in bf16["trainable"]), bf16["trainable"]
        for name, w in bf16["init"].items():
            moved = float((bf16["after"][name] - w).abs().max())
            assert (moved > 1e-3) if name in bf16["trainable"] else moved == 0.0, name
        for key in ("loss", "kl_ref"):
            for step in (0, 1):
                assert bf16["steps"][step][key] == pytest.approx(fp32["steps"][step][key],
                                                                 abs=2e-2), key
        assert bf16["steps"][1]["kl_ref"] > 1e-6
    assert two["bfloat16"]["steps"][1]["loss"] == pytest.approx(
        one["bfloat16"]["steps"][1]["loss"], abs=2e-2)
    for out, res in ((tmp_path / "one", one), (tmp_path / "two", two)):
        check_export(out / "export", res["after"])
    from areal_like.settings.config import load_config
    from trainer.checkpoint import latest_checkpoint
    from trainer.export import export_checkpoint

    offline = export_checkpoint(latest_checkpoint(tmp_path / "two" / "ckpt"),  # areal-like export
                                tmp_path / "offline",
                                load_config([*SETTINGS, "export.merged=true"]))
    check_export(offline, two["policy"])  # the checkpoint holds the weights after step 1


def check_export(directory: Path, state: dict) -> None:
    """PEFT's adapter-on-base and the merged export give the adapted logits (1e-5)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from areal_like.settings.config import load_config
    from areal_like.weights.hf import build_model
    from areal_like.weights.lora import add_adapters

    cfg = load_config(SETTINGS)
    trained = add_adapters(build_model(cfg.model), cfg.trainer.lora).eval()
    trained.load_state_dict(state)
    import json

    assert json.loads((directory / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft_loaded = PeftModel.from_pretrained(build_model(cfg.model), str(directory)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(directory / "merged"),
                                                  dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80], [1, 9, 8, 7, 6, 5, 4, 3]])
    with torch.no_grad():
        want = trained(ids).logits
        base = build_model(cfg.model)(ids).logits
        assert (want - base).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(peft_loaded(ids).logits, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
