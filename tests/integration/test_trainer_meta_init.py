"""The policy is built on meta and materialised shard by shard (trainer/sharded_init.py), 1 and 2
ranks: bit-identical to build_model (tied, untied) and from_pretrained (and its KL reference);
checkpoint loading never holds a full copy; activation checkpointing changes no loss or gradient.
Worker: ``python -c RUNNER test_trainer_meta_init.py OUT_DIR`` (the model in OUT_DIR/../hf).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 300
SEED = 3


def _cfg(*overrides: str):
    from areal_like.settings.config import load_config

    return load_config(["trainer.micro_batch_size=4", f"model.init_seed={SEED}", *overrides])


def _grads_after_one_microbatch(policy, cfg) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from trainer.data import groups_to_batch
    from trainer.step import StepSettings, batch_logp, forward_backward, minibatch_advantages

    batch = groups_to_batch(synthetic_groups())
    s = StepSettings.from_config(cfg)
    # the default kernel (decoupled PPO) uses it
    prox = batch_logp(policy.model, batch, s, policy.device)
    adv = minibatch_advantages(policy, batch, torch.arange(batch.mask.shape[0]), s).values
    # the same 8 sequences whatever the world
    rows = torch.arange(policy.rank, 8, policy.world_size)
    mb = batch.select(rows)
    n_tokens, n_seqs = float(batch.mask[:8].sum()), 8.0
    # the MLP runs inside the checkpointed block forward: twice per pass when recomputed
    # (a PRE-hook: the recompute stops early, inside down_proj, once it has every tensor
    # backward needs)
    calls = []
    hook = policy.model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    stats = forward_backward(policy, mb, adv[rows, :mb.mask.shape[1]],
                             prox[rows, :mb.mask.shape[1]], s,
                             s.loss_config(batch), n_tokens, n_seqs, packed=s.pack_sequences)
    hook.remove()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in policy.model.named_parameters()}
    return {"grads": grads, "stats": {k: float(v) for k, v in stats.items() if v.numel() == 1},
            "mlp_calls": len(calls)}


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from benchmarks.memory import PeakTensorBytes
    from tests.helpers_trainer import full_state_dict
    from trainer.model import build_policy, build_reference, init_distributed, leave_distributed

    res: dict = {}
    rank, world = init_distributed(_cfg().trainer)
    for tie in (False, True):
        cfg = _cfg(f"model.tie_word_embeddings={tie}")
        policy = build_policy(cfg.model, cfg.trainer)
        res[f"init_tie={tie}"] = full_state_dict(policy.model)
        res[f"rotary_tie={tie}"] = policy.model.model.rotary_emb.inv_freq.clone()
    cfg = _cfg(f"model.path={out_dir.parent / 'hf'}")
    with PeakTensorBytes() as m:
        policy = build_policy(cfg.model, cfg.trainer)
    # 1 rank: plain parameters (not sharded); 2 ranks: DTensors, their local shards
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4
                for p in policy.model.parameters())
    res["peak_loaded"] = {"peak": m.peak, "local": local}
    res["loaded"] = full_state_dict(policy.model)
    ref = build_reference(cfg.model, cfg.trainer)
    res["reference"] = full_state_dict(ref)
    for ac in (False, True):
        cfg = _cfg(f"trainer.activation_checkpointing={ac}")
        policy = build_policy(cfg.model, cfg.trainer)
        res[f"ac={ac}"] = _grads_after_one_microbatch(policy, cfg)
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


def _assert_bit_equal(got: dict, want: dict) -> None:
    import torch

    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k], w.detach().float()), k


@pytest.mark.timeout(WORKER_TIMEOUT_S + 60)  # as the module fixture's wait was
def test_sharded_init_load_and_checkpointing_on_one_and_two_ranks(tmp_path, spawn_python,
                                                                  free_port):
    import torch
    from transformers import AutoModelForCausalLM

    from areal_like.weights.hf import build_model

    model_dir = tmp_path / "hf"
    # another seed than the config-built runs, in three safetensors files and an index
    build_model(_cfg("model.init_seed=11").model, dtype="float32").save_pretrained(
        model_dir, max_shard_size="500KB")
    assert len(list(model_dir.glob("*.safetensors"))) == 3
    dirs = spawn_python.one_and_two_ranks(RUNNER, __file__, tmp_path, free_port(),
                                          WORKER_TIMEOUT_S)
    pretrained = dict(AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                           dtype=torch.float32).named_parameters())
    built = {tie: build_model(_cfg(f"model.tie_word_embeddings={tie}").model, dtype="float32")
             for tie in (False, True)}
    params = list(built[False].parameters())
    full, largest = sum(p.numel() * 4 for p in params), max(p.numel() * 4 for p in params)
    for world, out in zip((1, 2), dirs):
        res = torch.load(out / "res.pt")
        # config init equals build_model bit for bit, tied or not
        for tie, model in built.items():
            _assert_bit_equal(res[f"init_tie={tie}"], dict(model.named_parameters()))
            assert res[f"rotary_tie={tie}"].equal(model.model.rotary_emb.inv_freq)
        # the safetensors load equals from_pretrained, and so does its KL reference (fp32 on CPU)
        _assert_bit_equal(res["loaded"], pretrained)
        _assert_bit_equal(res["reference"], pretrained)
        # another seed: not vacuous
        assert not torch.equal(res["loaded"]["lm_head.weight"],
                               res["init_tie=False"]["lm_head.weight"])
        # loading a checkpoint never holds a full copy: the shards of this rank, one full
        # parameter being written and one scratch tensor of the same size
        got = res["peak_loaded"]
        assert got["local"] * world == pytest.approx(full, rel=0.01), world
        assert got["peak"] <= got["local"] + 2 * largest + 64 * 1024, world
        if world == 2:
            assert got["peak"] < 0.8 * full
        # activation checkpointing keeps loss and gradients; on: the block's forward ran again
        off, on = res["ac=False"], res["ac=True"]
        assert (off["mlp_calls"], on["mlp_calls"]) == (1, 2)
        assert off["stats"] == on["stats"]
        assert (set(off["grads"]) == set(on["grads"])
                and "model.layers.0.self_attn.q_proj.weight" in on["grads"])
        for k, g in off["grads"].items():
            torch.testing.assert_close(on["grads"][k], g, rtol=0, atol=1e-7, msg=f"{world} {k}")
        assert max(float(g.abs().max()) for g in off["grads"].values()) > 1e-3


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
