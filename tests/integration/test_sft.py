"""``areal-like sft`` of a user's own tiny Qwen2 on one-digit additions, then RL from it; 2 ranks
train the weights one trains; LoRA writes PEFT's layout and a merged model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import live_children, run_cli

pytestmark = pytest.mark.slow


def _summary(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def user_model(directory: Path) -> Path:
    """A random-initialized tiny Qwen2 and the char tokenizer, as ``save_pretrained`` writes."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from areal_like.tasks.tokenizer import char_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=104, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    char_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.mark.timeout(900)
def test_sft_then_a_run_that_starts_from_it(tmp_path):
    before = live_children()
    model = user_model(tmp_path / "model")
    data = tmp_path / "one_digit.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))
    common = ["model=local_hf", f"model.path={model}", "task=dataset",
              f"task.dataset_path={data}", f"task.eval_path={data}",
              "task.reward_fn=areal_like.tasks.task:exact_match", "task.max_new_tokens=4",
              "warm_start.steps=150", "warm_start.lr=3e-3"]
    sft = _summary(run_cli("sft", *common, f"run_dir={tmp_path / 'runs' / 'sft'}"))
    assert sft["ok"] and sft["steps"] == 150 and sft["examples"] == 100
    assert sft["loss_last"] < sft["loss_first"] / 5
    assert sft["greedy_acc"] >= 0.6 and sft["eval_prompts"] == 100
    out = Path(sft["out"])
    assert out.parent == tmp_path / "runs" / "warmstart" and sft["model"] == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "areal_like_task.yaml"):
        assert (out / name).is_file(), name

    r = run_cli("run", "-q", *common, f"run_dir={tmp_path / 'runs' / 'rl'}", "trainer.steps=3",
             "task.group_size=4", "buffer.groups_per_step=4", "launch.num_rollout_servers=1",
             "launch.trainer_ranks=1")
    run = _summary(r)
    assert f"[warm-start] cached: {out}" in r.stderr  # not trained again
    assert run["ok"] and run["steps"] == 3
    assert run["eval_last"]["n"] == 100 and run["eval_last"]["greedy_accuracy"] >= 0.6

    again = run_cli("sft", *common, f"run_dir={tmp_path / 'runs' / 'sft'}")
    assert again.returncode == 2
    assert f"error: {out} exists: give --out a new directory" in again.stderr
    assert live_children() <= before


@pytest.mark.timeout(900)
def test_two_ranks_train_as_one_and_lora_writes_a_merged_model(tmp_path):
    from safetensors.torch import load_file

    before = live_children()
    # no accuracy line after SFT (eval_prompts=0, ~4 CPU-s a call): this test compares weights
    common = ["experiment=quickstart", "warm_start.steps=5", "trainer.micro_batch_size=16",
              "warm_start.eval_prompts=0",
              f"run_dir={tmp_path / 'runs' / 'r'}"]
    one = _summary(run_cli("sft", *common, "--out", str(tmp_path / "one")))
    two = _summary(run_cli("sft", "--nproc-per-node", "2", *common, "--out", str(tmp_path / "two")))
    assert one["loss_first"] == two["loss_first"]
    assert abs(one["loss_last"] - two["loss_last"]) < 1e-3
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

    lora = _summary(run_cli("sft", *common, "trainer.lora.rank=4", "warm_start.lr=1e-2",
                         "--out", str(tmp_path / "lora")))
    assert lora["model"] == str(tmp_path / "lora" / "merged")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    merged = load_file(str(tmp_path / "lora" / "merged" / "model.safetensors"))
    assert merged.keys() == a.keys()  # a plain model: RL starts from it as from any directory
    assert live_children() <= before
