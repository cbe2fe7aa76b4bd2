"""The family table (README "Supported models"): a tiny random model of each family, on CPU.

Meta build equals from_pretrained bit for bit; the embedded engine serves it with the trainer's
log-probs; a step moves every parameter with a gradient; checkpoint and export round trip; the
push names the checkpoint's tensors and reaches every engine parameter; LoRA targets exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.families import FAMILIES, WINDOW, save_family
from trainer.packed_attention import Packing

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
LONG = 24  # sampled tokens: prompts plus outputs run past the families' 8-token window
ATOL = 1e-5
MIXTURES = ("qwen3_moe", "gpt_oss")  # experts fused into parameters (transformers 5)


def _cfg(model_dir: Path, *overrides: str):
    from areal_like.settings.config import load_config

    # the default attention, sdpa, whatever the family: GPT-OSS (sinks, no SDPA) runs eager
    return load_config([f"model.path={model_dir}", "trainer.lr=1e-2", "trainer.grad_clip=1e9",
                        *overrides])


def _step(policy, cfg) -> None:
    """One train step on the trainer invariance tests' synthetic groups."""
    from test_trainer_invariance import synthetic_groups

    from trainer.data import groups_to_batch
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    batch = groups_to_batch(synthetic_groups())
    s = StepSettings.from_config(cfg)
    train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))


@pytest.fixture(scope="module")
def group():
    from trainer.model import init_distributed, leave_distributed

    init_distributed(_cfg(Path(".")).trainer)
    yield
    leave_distributed()


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path_factory, group):
    d = tmp_path_factory.mktemp(request.param)
    save_family(request.param, d)
    return request.param, d


def _scheduled(model, prompts: list[list[int]]):
    from rollout_server.engine.sampling import SamplingParams
    from tests.unit.test_engine_fastpath import run

    params = [SamplingParams(max_new_tokens=LONG, temperature=1.0, ignore_eos=True,
                             sampling_seed=i) for i in range(len(prompts))]
    return run(model, prompts, params, max_running=2)


def test_meta_build_engine_logprobs_and_lora_targets_match_the_family(family):
    from areal_like.settings.config import LoraConfig
    from areal_like.weights.hf import build_meta_model, build_model
    from areal_like.weights.lora import add_adapters, check_targets
    from launch.preflight import check_architecture
    from tests.helpers_trainer import full_state_dict
    from trainer.model import build_policy

    name, d = family
    cfg = _cfg(d)
    assert check_architecture(cfg) == []
    policy = build_policy(cfg.model, cfg.trainer)
    ref = build_model(cfg.model)  # from_pretrained: transformers' own loading and conversion
    mine = full_state_dict(policy.model)
    theirs = dict(ref.named_parameters())
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    ref_buffers = dict(ref.named_buffers())
    for k, v in policy.model.named_buffers():
        assert torch.equal(v, ref_buffers[k]), k

    # the engine's own build serves it; its log-probs are the trainer's and the model's forward's
    engine_model = build_model(cfg.model)
    prompts = [[1, 5, 9, 30, 41], [1, 60, 7], [1, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]
    done = _scheduled(engine_model, prompts)
    seqs = [p + r.output_ids for p, r in zip(prompts, done)]
    assert max(len(q) for q in seqs) > 2 * WINDOW  # past the window: sliding layers differ
    for seq, p, r in zip(seqs, prompts, done):
        ids = torch.tensor([seq])
        pos = torch.arange(len(p) - 1, len(seq) - 1)[None]
        with torch.no_grad():
            trainer = policy.model.policy_logprobs(ids, pos, 1.0, 64)[0]
            own = torch.log_softmax(ref(ids).logits[0, pos[0]].float(), -1)
        own = own.gather(1, ids[0, pos[0] + 1][:, None])[:, 0]
        engine = torch.tensor(r.output_logprobs)
        assert (own - trainer).abs().max() <= ATOL, (name, 'trainer')
        assert (engine - trainer).abs().max() <= ATOL, (name, 'engine')
    # packed: every sequence in one row, attention within each
    flat = torch.tensor([sum(seqs, [])])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    pos = torch.cat([torch.arange(c + len(p) - 1, c + len(s) - 1)
                     for c, p, s in zip(cu[:-1].tolist(), prompts, seqs)])[None]
    with torch.no_grad():
        packed = policy.model.policy_logprobs(flat, pos, 1.0, 64,
                                              Packing.of([len(s) for s in seqs], flat.device))[0]
    engine = torch.tensor(sum((r.output_logprobs for r in done), []))
    assert (engine - packed).abs().max() <= ATOL, name

    model = build_meta_model(cfg.model)
    lora = LoraConfig(rank=4)
    check_targets(model, lora)  # raises when a default target matches no linear layer
    add_adapters(model, lora)
    adapted = {n.rsplit(".", 3)[0].rsplit(".", 1)[-1]
               for n, _ in model.named_parameters() if ".lora_A." in n}
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    # every default target the model has as a linear layer; a mixture's fused experts are not
    assert adapted == attention | (set() if name in MIXTURES else mlp)


def _tensor_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            names |= set(sf.keys())
    return names


def test_train_checkpoint_export_and_weight_sync_reach_every_parameter(family, tmp_path):
    from areal_like.tasks.tokenizer import load_tokenizer
    from areal_like.weights.hf import build_model
    from rollout_server.engine.scheduler import Scheduler
    from rollout_server.engine.weights import WeightUpdater
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.export import export_hf
    from trainer.model import build_policy
    from trainer.weight_buckets import PushTensors, gather
    from trainer.weight_local import tensor_payload
    from trainer.weight_sync import push_buckets

    _, d = family
    cfg = _cfg(d)
    policy = build_policy(cfg.model, cfg.trainer)
    before = full_state_dict(policy.model)
    _step(policy, cfg)
    after = full_state_dict(policy.model)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == set(after), sorted(set(after) - moved)  # experts and router included

    # checkpoint round trip into a fresh policy
    path = save_checkpoint(tmp_path / "ckpt", policy, version=1)
    fresh = build_policy(cfg.model, cfg.trainer)
    load_checkpoint(path, fresh)
    restored = full_state_dict(fresh.model)
    assert all(torch.equal(restored[k], v) for k, v in after.items())

    # export: from_pretrained loads it, same logits
    out = export_hf(policy.model, tmp_path / "export", model_cfg=cfg.model,
                    tokenizer=load_tokenizer(cfg.model), shard_mb=1, dtype="float32")
    # under the checkpoint's own names (save_pretrained's: a mixture's experts one by one)
    assert _tensor_names(out) == _tensor_names(d)
    exported = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "path": str(out)}))
    ids = torch.tensor([[1, 5, 9, 30, 41, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        policy.model.eval()
        assert torch.allclose(exported(ids).logits, policy.model(ids).logits, atol=ATOL)

    # weight sync (the trainer's push, bucket by bucket, through the engine's loader): under the
    # checkpoint's own names (what SGLang's load_weights takes: a mixture's experts one by one,
    # a fused parameter split over buckets), every engine parameter, bit for bit
    push = PushTensors(policy.model)
    assert {n for n, *_ in push.entries} == _tensor_names(d)
    buckets = push_buckets(push, "float32", bucket_mb=0.02)
    engine_model = build_model(cfg.model)
    sched = Scheduler(engine_model, max_running=2, max_total_tokens=512, context_len=256,
                      weight_version="0").start()
    try:
        updater = WeightUpdater(sched, cfg.model, group_timeout_s=30)
        for i, b in enumerate(buckets):
            named = list(zip(b.names, gather(push, b, "float32")))
            last = i == len(buckets) - 1
            ok = updater.update_from_tensor([tensor_payload(named)], None,
                                            "1" if last else None, False)
            ok = ok.result(60) if hasattr(ok, "result") else ok
            assert ok[0], ok
        assert sched.weight_version == "1"
        served = dict(engine_model.named_parameters())
        assert served.keys() == after.keys()
        assert all(torch.equal(served[k], v) for k, v in after.items())
    finally:
        sched.stop(timeout_s=10)
        updater.close()


@pytest.mark.parametrize("name", MIXTURES)
def test_the_router_aux_loss_is_off_by_default_and_a_switch_turns_it_on(name, tmp_path, group):
    """Router aux loss: off by default (no router logits); on, it joins and moves the router."""
    from tests.helpers_trainer import full_state_dict
    from trainer.model import build_policy

    d = save_family(name, tmp_path / "hf")
    states, asked = {}, {}
    for coef in (0.0, 10.0):
        cfg = _cfg(d, f"trainer.router_aux_loss_coef={coef}")
        policy = build_policy(cfg.model, cfg.trainer)
        calls = []
        policy.model.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kw: calls.append(kw.get("output_router_logits", False)),
            with_kwargs=True)
        _step(policy, cfg)
        states[coef], asked[coef] = full_state_dict(policy.model), any(calls)
    assert asked == {0.0: False, 10.0: True}
    routers = [k for k in states[0.0] if k.endswith("mlp.gate.weight") or ".router." in k]
    assert routers and all(not torch.equal(states[0.0][k], states[10.0][k]) for k in routers)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        dense = save_family("qwen3", tmp_path / "dense")
        cfg = _cfg(dense, "trainer.router_aux_loss_coef=1.0")
        build_policy(cfg.model, cfg.trainer)

# ---- two FSDP2 ranks (gloo, real processes) against one, for the families new to the trainer
RANKED = ("qwen3_moe", "gemma3")
WORKER_TIMEOUT_S = 300


def worker(out: str, model_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from tests.helpers_trainer import full_state_dict
    from trainer.model import build_policy, init_distributed, leave_distributed

    torch.set_num_threads(1)
    cfg = _cfg(Path(model_dir))
    rank, world = init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
    # each decoder block is its own FSDP2 unit: its parameters (fused experts included) sharded
    block = policy.model.model.layers[0]
    sharded = {n: tuple(p.to_local().shape) for n, p in block.named_parameters()
               if isinstance(p, DTensor)}
    init = full_state_dict(policy.model)
    _step(policy, cfg)
    state = full_state_dict(policy.model)
    if rank == 0:
        torch.save({"init": init, "state": state, "sharded": sharded,
                    "block_params": {n: tuple(p.shape) for n, p in block.named_parameters()}},
                   out)
    leave_distributed()


def _spawn(out: Path, model_dir: Path, rank: int | None = None, world: int = 1, port: int = 0):
    import subprocess

    from tests.conftest import child_env

    env = child_env()
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, __file__, str(out), str(model_dir)],
                            env=env, cwd=ROOT)


@pytest.mark.parametrize("name", RANKED)
def test_two_fsdp2_ranks_shard_each_block_and_train_as_one(name, tmp_path):
    from areal_like.net.distributed import free_port
    from tests.conftest import wait_all

    d = save_family(name, tmp_path / "hf")
    port = free_port()
    procs = [_spawn(tmp_path / "one.pt", d), _spawn(tmp_path / "two.pt", d, 0, 2, port),
             _spawn(tmp_path / "unused.pt", d, 1, 2, port)]
    wait_all(procs, WORKER_TIMEOUT_S)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["sharded"] == {}  # one fp32 rank: plain parameters
    assert set(two["sharded"]) == set(two["block_params"])
    for n, shape in two["block_params"].items():  # dim 0 split in two (experts: 4 -> 2 each)
        assert two["sharded"][n][0] == (shape[0] + 1) // 2, n
    for k, v in one["init"].items():
        assert torch.equal(two["init"][k], v), k
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=0, atol=2e-5, msg=k)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[1], sys.argv[2])
    from areal_like.daemon import exit_process

    exit_process(0)  # as the trainer exits (tests/integration/test_trainer_meta_init.py)
