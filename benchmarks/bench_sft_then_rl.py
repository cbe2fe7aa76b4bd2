"""SFT then RL on your own model: held-out greedy accuracy of 2-digit addition.

A user's path, through the CLI: a random-initialized tiny Qwen2 (transformers, the project's char
tokenizer) and a JSONL of every ``a+b=`` with 10 <= a, b <= 99 (512 rows held out for
evaluation). ``areal-like sft`` trains it on the train rows, then ``areal-like run`` does RL from
the SFT's output; the baseline, in the same run, is ``areal-like run`` from the random model with
the same RL settings. One JSON line (figure: the final in-run evaluation's greedy accuracy after
SFT -> RL; baseline: after RL alone; goal: figure >= 0.5; ratio: figure / max(baseline, 1/512)).

    python benchmarks/bench_sft_then_rl.py [--root DIR] [--sft-steps 1500] [--rl-steps 100]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL_ROWS = 512
GOAL = 0.5  # held-out greedy accuracy after SFT -> RL
# what a user sets for this data and a model this small (the schema's rates are for
# billion-parameter models); the answers are at most 3 digits
TASK = ("task=dataset", "task.reward_fn=areal_like.tasks.task:exact_match",
        "task.max_new_tokens=8")
RL = ("trainer.lr=1e-4", "trainer.checkpoint_every=1000000", "eval.every=1000000",
      "eval.at_end=true")  # evaluations at version 0 and at the end


def make_model(directory: Path, seed: int = 0) -> Path:
    """A random-initialized tiny Qwen2 (2 layers, width 128) and the char tokenizer, saved as a
    user's Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.utils import logging as hf_logging

    from areal_like.tasks.tokenizer import char_tokenizer

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=104, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    char_tokenizer().save_pretrained(str(directory))
    return directory


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def addition_data(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(train JSONL, held-out JSONL): every 2-digit ``a+b=`` split by a fixed shuffle."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
            for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(rows)
    return (write_rows(root / "train.jsonl", rows[EVAL_ROWS:]),
            write_rows(root / "eval.jsonl", rows[:EVAL_ROWS]))


def cli(*args: str) -> dict:
    """``areal-like ARGS``; its last stdout line (the JSON summary)."""
    done = subprocess.run([sys.executable, "-m", "launch.cli", *args], stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="working directory (default: a new temporary one)")
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--rl-steps", type=int, default=100)
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_sft_then_rl_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "model")
    train, held = addition_data(root)
    data = (*TASK, f"task.dataset_path={train}", f"task.eval_path={held}")
    t0 = time.monotonic()
    sft = cli("sft", "model=local_hf", f"model.path={model}", *data,
              f"warm_start.steps={args.sft_steps}", f"warm_start.lr={args.sft_lr}",
              "--out", str(root / "sft"), f"run_dir={root / 'runs' / 'sft'}")
    sft_s = time.monotonic() - t0
    runs = {}
    for name, start in (("sft_rl", sft["model"]), ("rl_only", str(model))):
        runs[name] = cli("run", "-q", "model=local_hf", f"model.path={start}", *data, *RL,
                         f"trainer.steps={args.rl_steps}", f"run_dir={root / 'runs' / name}")
    figure = runs["sft_rl"]["eval_last"]["greedy_accuracy"]
    baseline = runs["rl_only"]["eval_last"]["greedy_accuracy"]
    print(json.dumps({
        "name": "sft_then_rl_addition2", "figure": figure, "unit": "held-out greedy accuracy",
        "baseline": baseline, "ratio": round(figure / max(baseline, 1 / EVAL_ROWS), 2),
        "goal": GOAL, "passed": figure >= GOAL,
        "sft": {k: sft.get(k) for k in ("steps", "loss_first", "loss_last", "greedy_acc")}
        | {"wall_s": round(sft_s, 1)},
        "rl_steps": args.rl_steps,
        "version0_greedy": {n: r.get("eval_first", {}).get("greedy_accuracy")
                            for n, r in runs.items()},
        "rl_wall_s": {n: r["wall_s"] for n, r in runs.items()}, "root": str(root)}), flush=True)


if __name__ == "__main__":
    main()
