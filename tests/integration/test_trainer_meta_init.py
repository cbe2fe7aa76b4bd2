"""The policy is built on meta and materialised shard by shard (trainer/sharded_init.py), 1 and 2
ranks: bit-identical to build_model (tied, untied) and from_pretrained (and its KL reference);
checkpoint loading never holds a full copy; activation checkpointing changes no loss or gradient.
Worker: ``python test_trainer_meta_init.py OUT MODEL_DIR``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def worker(out: str, model_dir: str) -> None:
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
    cfg = _cfg(f"model.path={model_dir}")
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
        torch.save(res, out)
    leave_distributed()


def _spawn(out: Path, model_dir: Path, rank: int | None = None, world: int = 1, port: int = 0):
    from tests.conftest import child_env

    env = child_env()
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, __file__, str(out), str(model_dir)], env=env,
                            cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from areal_like.net.distributed import free_port
    from areal_like.weights.hf import build_model
    from tests.conftest import wait_all

    tmp = tmp_path_factory.mktemp("meta_init")
    model_dir = tmp / "hf"
    # another seed than the config-built runs, in three safetensors files and an index
    build_model(_cfg("model.init_seed=11").model, dtype="float32").save_pretrained(
        model_dir, max_shard_size="500KB")
    port = free_port()
    procs = [_spawn(tmp / "one.pt", model_dir), _spawn(tmp / "two.pt", model_dir, 0, 2, port),
             _spawn(tmp / "unused.pt", model_dir, 1, 2, port)]
    wait_all(procs, WORKER_TIMEOUT_S)
    import torch

    return {"model_dir": model_dir, 1: torch.load(tmp / "one.pt"), 2: torch.load(tmp / "two.pt")}


def _assert_bit_equal(got: dict, want: dict) -> None:
    import torch

    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k], w.detach().float()), k


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_config_init_equals_build_model_bit_for_bit(results, world, tie):
    from areal_like.weights.hf import build_model

    model = build_model(_cfg(f"model.tie_word_embeddings={tie}").model, dtype="float32")
    _assert_bit_equal(results[world][f"init_tie={tie}"], dict(model.named_parameters()))
    assert results[world][f"rotary_tie={tie}"].equal(model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("world", [1, 2])
def test_safetensors_load_equals_from_pretrained(results, world):
    import torch
    from transformers import AutoModelForCausalLM

    assert len(list(results["model_dir"].glob("*.safetensors"))) == 3
    model = AutoModelForCausalLM.from_pretrained(str(results["model_dir"]), dtype=torch.float32)
    _assert_bit_equal(results[world]["loaded"], dict(model.named_parameters()))
    _assert_bit_equal(results[world]["reference"], dict(model.named_parameters()))  # fp32 on CPU
    loaded, built = results[world]["loaded"], results[world]["init_tie=False"]
    # another seed: not vacuous
    assert not torch.equal(loaded["lm_head.weight"], built["lm_head.weight"])


@pytest.mark.parametrize("world", [1, 2])
def test_loading_a_checkpoint_never_holds_a_full_copy(results, world):
    from areal_like.weights.hf import build_model

    params = list(build_model(_cfg().model, dtype="float32").parameters())
    full = sum(p.numel() * 4 for p in params)
    largest = max(p.numel() * 4 for p in params)
    got = results[world]["peak_loaded"]
    assert got["local"] * world == pytest.approx(full, rel=0.01)  # the shards of this rank
    # the shards, one full parameter being written and one scratch tensor of the same size
    assert got["peak"] <= got["local"] + 2 * largest + 64 * 1024
    if world == 2:
        assert got["peak"] < 0.8 * full


@pytest.mark.parametrize("world", [1, 2])
def test_activation_checkpointing_keeps_loss_and_gradients(results, world):
    import torch

    off, on = results[world]["ac=False"], results[world]["ac=True"]
    # on: the block's forward ran again in backward
    assert (off["mlp_calls"], on["mlp_calls"]) == (1, 2)
    assert off["stats"] == on["stats"]
    assert (set(off["grads"]) == set(on["grads"])
            and "model.layers.0.self_attn.q_proj.weight" in on["grads"])
    for k, g in off["grads"].items():
        torch.testing.assert_close(on["grads"][k], g, rtol=0, atol=1e-7, msg=k)
    assert max(float(g.abs().max()) for g in off["grads"].values()) > 1e-3


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(sys.argv[1], sys.argv[2])
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
