"""The recipes (configs/RECIPES.md) through ``areal-like run`` on CPU with a tiny random model of
each family and the shipped data samples (prepare_math): the recipe's settings reach the run, a
few steps train, the test split is evaluated at start and end, the export is of the family, and
the GPU layout matches its header (areal-like plan). Nothing here says how well it learns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import child_env
from tests.families import family_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "areal_like" / "tasks" / "data" / "samples"
ONE_GPU = {("0", "trainer"): "0", ("0", "rollout-0"): "0"}  # shared: SGLang takes 0.4 of it
RECIPES = {  # experiment -> (the family of its model, its dataset, its GPU layout: areal-like plan)
    "gsm8k_qwen25_05b": ("qwen2", "gsm8k", ONE_GPU),
    "math_qwen25_15b": ("qwen2", "math", ONE_GPU),
    "math_qwen25_7b": ("qwen2", "math", {("0", "trainer"): "0,1,2,3",
                                         **{("0", f"rollout-{i}"): str(4 + i) for i in range(4)}}),
    "math_qwen3_30b_a3b": ("qwen3_moe", "math", {
        ("0", "trainer"): "0,1,2,3,4,5,6,7", ("1", "trainer-n1"): "0,1,2,3,4,5,6,7",
        **{(str(2 + i // 4), f"rollout-{i}"): f"{2 * (i % 4)},{2 * (i % 4) + 1}"
           for i in range(8)}}),
}
# the GPU layouts as one CPU process each (so no expert parallelism), and a test-sized job
CPU = ["topology=local_cpu", "launch.gpus_per_node=0", "launch.nodes=1", "launch.train_nodes=1",
       "launch.trainer_ranks=1", "launch.num_rollout_servers=1", "rollout.engine.tp_size=1",
       "trainer.expert_parallel=1"]
SHORT = ["trainer.steps=3", "task.max_new_tokens=16", "buffer.groups_per_step=2",
         "task.group_size=4", "task.reward_fn=tests.recipe_reward:graded_or_odd",
         "launch.health_timeout_s=180"]

pytestmark = pytest.mark.slow


def _cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # child_env: the repository importable (task.reward_fn names tests.recipe_reward) without
    # the editable install's path or a PYTHONPATH of the caller's
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def _tiny_model(family: str, directory: Path) -> Path:
    """A tiny random family model with the BPE tokenizer and a ChatML template."""
    import torch
    from transformers import AutoModelForCausalLM

    from areal_like.tasks.tokenizer import bpe_tokenizer

    torch.manual_seed(0)
    tok = bpe_tokenizer(512)
    config = family_config(family)
    config.vocab_size, config.max_position_embeddings = 512, 2048
    config.bos_token_id, config.eos_token_id = None, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def _prepare(cwd: Path, kind: str) -> None:
    done = subprocess.run([sys.executable, "-m", "areal_like.tasks.prepare_math", kind,
                           "--train", str(SAMPLES / kind / "train.jsonl"),
                           "--test", str(SAMPLES / kind / "test.jsonl")],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_a_tiny_model_of_its_family_and_lays_out_as_its_header_says(name, tmp_path):
    family, kind, layout = RECIPES[name]
    _prepare(tmp_path, kind)
    model = _tiny_model(family, tmp_path / "model")
    run_dir = tmp_path / "run"
    done = _cli(tmp_path, "run", "-q", f"experiment={name}", f"model.path={model}",
                f"run_dir={run_dir}", *CPU, *SHORT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps_trained"] == 3

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "configs" / "experiment" / f"{name}.yaml").read_text())
    assert cfg["task"]["dataset_path"] == str(tmp_path / "data" / kind / "train.parquet")
    assert cfg["task"]["eval_path"] == str(tmp_path / "data" / kind / "test.parquet")
    assert cfg["task"]["system_prompt"] == recipe["task"]["system_prompt"]
    assert r"\boxed{}" in cfg["task"]["system_prompt"]
    for key in ("lr", "warmup_steps", "activation_checkpointing", "max_tokens_per_micro_batch"):
        assert cfg["trainer"][key] == recipe["trainer"][key], key

    steps = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").open()]
    stats = [s["stats"] for s in steps if "stats" in s]
    assert len(stats) == 3 and all(0 < s["lr"] < recipe["trainer"]["lr"] for s in stats)  # warmup
    assert any(s["grad_norm"] > 0 for s in stats)
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").open()]
    assert [e["policy_version"] for e in evals][::len(evals) - 1] == [0, 3]
    assert all(e["n"] == 12 for e in evals)  # the sample's whole test split
    exported = json.loads(next((run_dir / "export").glob("*/config.json")).read_text())
    assert exported["model_type"] == family

    one_gpu = ["launch.gpus_per_node=1"] if layout is ONE_GPU else []  # the user's GPU count
    done = _cli(tmp_path, "plan", f"experiment={name}", f"model.path={model}", *one_gpu,
                "buffer.address=tcp://10.0.0.1:5555", "buffer.pub_address=tcp://10.0.0.1:5556",
                "trainer.weight_sync.master_addr=10.0.0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("\n\n")[0]  # the memory estimate follows a blank line
    rows = [line.split() for line in table.splitlines()[1:]]
    assert {(r[0], r[1]): r[2] for r in rows if r[1] != "buffer"} == layout
    if layout is ONE_GPU:
        assert "mem_fraction_static=0.4" in done.stdout
