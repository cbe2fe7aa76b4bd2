"""The trainer's step on a mixture of experts against a dense model of the same active parameters.

Workload: ``bench_train_step``'s batch (8 groups x 8 samples of the addition task's shape, at most
8 new tokens), decoupled PPO, one micro-batch, one optimizer step, one trainer rank, one thread.
Two models built from their transformers configs (the char tokenizer's 104 ids, 2 layers, hidden
128, 4 heads over 2 KV heads of 32), saved and loaded through ``model.path`` as a user's:

* ``moe``: Qwen3-MoE, ``--experts`` experts of intermediate 64, top ``--top-k`` per token;
* ``dense`` (baseline): Qwen3 with intermediate ``top_k * 64``: the same parameters per token
  (the router aside).

Each is timed over ``--trials`` steps after ``--warmup``, alternately; one JSON line: figure = the
mixture's trained tokens per second, baseline = the dense model's, ratio = figure / baseline
(goal >= 0.5: transformers' mixture runs its experts one at a time).

    python benchmarks/bench_moe.py [--trials 20] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_train_step import trainer_step, workload_batch  # noqa: E402 (beside this script)
from transport_report import at_least, load_warning  # noqa: E402

GOAL = 0.5
MOE_INTERMEDIATE = 64
SIZES = dict(vocab_size=104, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def save(config, directory: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from areal_like.tasks.tokenizer import char_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    char_tokenizer().save_pretrained(str(directory))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=at_least(1), default=20)
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--experts", type=at_least(1), default=8)
    ap.add_argument("--top-k", type=at_least(1), default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import Qwen3Config, Qwen3MoeConfig

    from areal_like.settings.config import load_config
    from trainer.model import build_policy, init_distributed
    from trainer.step import StepSettings

    batch = workload_batch(8, 8, 8)
    configs = {
        "moe": Qwen3MoeConfig(**SIZES, num_experts=args.experts, intermediate_size=256,
                              num_experts_per_tok=args.top_k,
                              moe_intermediate_size=MOE_INTERMEDIATE),
        "dense": Qwen3Config(**SIZES, intermediate_size=args.top_k * MOE_INTERMEDIATE),
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, config in configs.items():
            path = save(config, Path(tmp) / name)
            cfg = load_config([f"model.path={path}", "task=addition", "loss=decoupled_ppo",
                               "trainer.lr=3e-5", "trainer.skip_zero_advantage=false",
                               "trainer.micro_batch_size=64"])
            init_distributed(cfg.trainer)
            runs[name] = (build_policy(cfg.model, cfg.trainer), StepSettings.from_config(cfg))
        for _ in range(args.warmup):
            for policy, settings in runs.values():
                trainer_step(policy, batch, settings)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.trials):
            for name, (policy, settings) in runs.items():
                t0 = time.perf_counter()
                trainer_step(policy, batch, settings)
                times[name].append(time.perf_counter() - t0)
    tps = {name: batch.n_tokens / statistics.median(t) for name, t in times.items()}
    params = {name: sum(p.numel() for p in policy.model.parameters())
              for name, (policy, _) in runs.items()}
    print(json.dumps({
        "name": "moe_train_step_vs_dense_same_active", "figure": round(tps["moe"], 1),
        "unit": "trained tokens/s (median step)", "baseline": round(tps["dense"], 1),
        "ratio": round(tps["moe"] / tps["dense"], 3), "goal": GOAL,
        "experts": args.experts, "top_k": args.top_k, "params": params,
        "tokens": batch.n_tokens, "trials": args.trials, **load_warning(),
    }))


if __name__ == "__main__":
    main()
