"""HF export (trainer/export.py) with real processes: a 2-rank export after an update loads with
from_pretrained with the trained logits, full index, tokenizer round trip, tied once, bf16 in one
file; the daemon exports at export.every and the end, and areal-like export of its checkpoint
matches the in-run export. Worker: ``python -c RUNNER test_export.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# cold torch + transformers imports of two ranks on a loaded 2-core machine, plus the work
TIMEOUT_S = 300
SHARD_MB = 1
PROBE = [[1, 40, 41, 42, 2, 50, 60, 70], [1, 7, 8, 9, 10, 11, 12, 13]]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import load_tokenizer
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.export import export_hf
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    results = {}
    for tied in (False, True):
        # 256 wide: ~5 MiB of fp32 weights, several 1 MiB shards
        cfg = load_config([f"model.tie_word_embeddings={tied}", "model.hidden_size=256",
                           "model.intermediate_size=512", "trainer.lr=1e-2"])
        rank, _ = init_distributed(cfg.trainer)
        policy = build_policy(cfg.model, cfg.trainer)
        s = StepSettings.from_config(cfg)
        batch = groups_to_batch(synthetic_groups())
        train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
        with torch.no_grad():
            # all ranks: FSDP2 all-gathers
            logits = policy.model(input_ids=torch.tensor(PROBE)).logits
        tok = load_tokenizer(cfg.model)
        export_hf(policy.model, out_dir / f"tied{int(tied)}", model_cfg=cfg.model, tokenizer=tok,
                  shard_mb=SHARD_MB, dtype="float32")
        if not tied:
            export_hf(policy.model, out_dir / "bf16", model_cfg=cfg.model, tokenizer=tok,
                      shard_mb=64, dtype="bfloat16")
        results[tied] = {"logits": logits.detach().clone(), "state": full_state_dict(policy.model)}
    if rank == 0:
        torch.save(results, out_dir / "trained.pt")
    leave_distributed()


def _tensors(directory: Path) -> dict[str, dict]:
    """Every tensor of every safetensors file: {file: {name: tensor}}."""
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


def check_layout(directory: Path, state: dict, tied: bool) -> None:
    """Sharded layout exactly as transformers writes it, and the exact trained tensors."""
    import torch

    files = _tensors(directory)
    n = len(files)
    assert n >= 3 and sorted(files) == [f"model-{k:05d}-of-{n:05d}.safetensors"
                                        for k in range(1, n + 1)]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    located = {name: f for f, ts in files.items() for name in ts}
    assert index["weight_map"] == located  # every tensor of every shard, in the file that holds it
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for ts in files.values() for t in ts.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for ts in files.values()
                                                        for t in ts.values())
    for ts in files.values():  # a shard stays under the limit unless it holds one tensor alone
        assert len(ts) == 1 or sum(t.numel() * 4 for t in ts.values()) <= SHARD_MB * 2**20
    expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert ("lm_head.weight" in located) is not tied  # a tied weight is written once
    assert set(located) == set(expected)
    for name, f in located.items():
        assert torch.equal(files[f][name], expected[name]), name


def check_loads(directory: Path, logits, tied: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from areal_like.tasks.tokenizer import char_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    assert (model.config.tie_word_embeddings is tied
            and model.config.architectures == ["Qwen2ForCausalLM"])
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    with torch.no_grad():
        got = model(input_ids=torch.tensor(PROBE)).logits
    torch.testing.assert_close(got, logits, rtol=0, atol=1e-5)
    ours, loaded = char_tokenizer(), AutoTokenizer.from_pretrained(str(directory))
    assert loaded("a+b=c")["input_ids"] == ours("a+b=c")["input_ids"]
    assert loaded.chat_template == ours.chat_template
    assert (loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
            == ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
    gen = GenerationConfig.from_pretrained(str(directory))
    assert ((gen.bos_token_id, gen.eos_token_id, gen.pad_token_id)
            == (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0))
    config = json.loads((directory / "config.json").read_text())
    assert (config["use_cache"] is True and config["dtype"] == "float32"
            and config["rope_theta"] == 10000.0)


def test_export_round_trip_from_two_fsdp_ranks(tmp_path, spawn_python, free_port):
    import torch
    from safetensors.torch import load_file

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [spawn_python(RUNNER, [__file__, tmp_path], capture=False,
                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    assert [p.wait(timeout=TIMEOUT_S) for p in procs] == [0, 0]
    trained = torch.load(tmp_path / "trained.pt")
    assert not list(tmp_path.glob(".tmp_*"))  # every export was renamed into place
    for tied in (False, True):
        check_layout(tmp_path / f"tied{int(tied)}", trained[tied]["state"], tied)
        check_loads(tmp_path / f"tied{int(tied)}", trained[tied]["logits"], tied)
    bf16 = tmp_path / "bf16"  # fits in one shard: the single-file name, no index
    assert sorted(p.name for p in bf16.glob("model*")) == ["model.safetensors"]
    weights = load_file(str(bf16 / "model.safetensors"))
    assert set(weights) == set(trained[False]["state"])
    for name, w in trained[False]["state"].items():
        assert (weights[name].dtype == torch.bfloat16
                and torch.equal(weights[name], w.to(torch.bfloat16))), name
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------- the daemon and `areal-like export`
def _lines(path: Path) -> list[dict]:
    return ([json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if path.is_file() else [])


def test_in_run_export_and_cli_export_of_the_checkpoint_agree(tmp_path, spawn_python, free_port):
    import torch
    from test_trainer_resume import ResumeBuffer

    from areal_like.settings.config import load_config, to_yaml

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
                       "trainer.steps=3", "trainer.checkpoint_every=2", "export.every=2",
                       f"export.shard_mb={SHARD_MB}", "trainer.loss.kl_coef=0.05",
                       "trainer.lr=1e-3", "trainer.micro_batch_size=4", "trainer.batch_wait_s=1"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    buffer = ResumeBuffer(address)
    try:
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        ranks = [spawn_python("trainer", ["--config-file", tmp_path / "config.yaml"], capture=False,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
        # trainer.steps reached: a clean exit
        assert [p.wait(timeout=TIMEOUT_S) for p in ranks] == [0, 0]
    finally:
        buffer.close()
    exports = tmp_path / "export"
    # every=2, and the end
    assert sorted(p.name for p in exports.iterdir()) == ["v00000002", "v00000003"]
    rows = _lines(tmp_path / "metrics" / "trainer.jsonl")
    assert [(r["policy_version"], r["path"]) for r in rows if r.get("event") == "export"] == [
        (2, str(exports / "v00000002")), (3, str(exports / "v00000003"))]
    steps = {r["step"]: r for r in rows if "step" in r}
    # reference = initial weights
    assert steps[1]["stats"]["kl_ref"] == 0.0 and steps[3]["stats"]["kl_ref"] > 0
    # a step's record holds that step's phases only: step 2 checkpoints and exports, 1 and 3 do
    # neither (3's export and checkpoint come after its record, at the end), and the setup's guard
    # is no step's
    assert {"checkpoint", "export", "ref_logp", "train_step"} <= set(steps[2]["phase_seconds"])
    for k in (1, 3):
        assert not ({"checkpoint", "export", "logprob_guard"}
                    & set(steps[k]["phase_seconds"])), steps[k]
        assert steps[k]["phase_seconds"]["fetch_batch"] == steps[k]["data_wait_seconds"]

    ckpt, out = tmp_path / "checkpoints" / "v00000002", tmp_path / "offline_v2"
    # config: <run_dir>/config.yaml by default
    cli = spawn_python("launch.cli", ["export", ckpt, out])
    stdout, stderr = cli.communicate(timeout=TIMEOUT_S)
    assert cli.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["out"] == str(out.resolve())
    in_run = exports / "v00000002"
    assert sorted(os.listdir(out)) == sorted(os.listdir(in_run))
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert (out / name).read_text() == (in_run / name).read_text(), name
    offline, online = _tensors(out), _tensors(in_run)
    assert offline.keys() == online.keys() and len(online) >= 2
    for f, ts in online.items():
        assert offline[f].keys() == ts.keys()
        for name, t in ts.items():
            assert torch.equal(offline[f][name], t), (f, name)
    final = _tensors(exports / "v00000003")  # and the update between them shows: v3 differs from v2
    assert any(not torch.equal(final[f][n], t) for f, ts in online.items() for n, t in ts.items())

    again = spawn_python("launch.cli", ["export", ckpt, out])
    assert again.communicate(timeout=TIMEOUT_S)[1].strip().endswith(
        "choose a new directory (an export never overwrites one)")
    assert again.returncode == 2
    wrong = spawn_python("launch.cli", ["export", tmp_path / "metrics", tmp_path / "x"])
    assert ("neither a trainer checkpoint nor a directory of them"
            in wrong.communicate(timeout=TIMEOUT_S)[1])
    assert wrong.returncode == 2 and not (tmp_path / "x").exists()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
