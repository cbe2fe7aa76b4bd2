"""The trainer's step versus a plain single-process PyTorch step of the same batch, same process
setup.

Workload (issue: cut the fixed cost of a step): the tiny Qwen2 of ``model=tiny`` (0.5M parameters),
2-digit addition prompts, 8 groups x 8 samples, at most 8 new tokens, decoupled PPO, one
micro-batch, one optimizer step, one trainer rank (a world-size-1 process group, as
``python -m trainer`` runs), one thread.

* ``trainer``: what a step of ``trainer/loop.py`` runs between the batch and the weight sync:
  ``recompute_prox_logp`` then ``train_step`` (advantages, forward/backward, clipping, AdamW, LR
  schedule, stats);
* ``plain`` (baseline): ``areal_like.weights.hf.build_model``'s unwrapped model on the same padded
  batch: one forward, full-vocabulary ``log_softmax``, the same decoupled-PPO token loss against
  ``behav_logp`` with GRPO advantages, ``backward``, ``clip_grad_norm_``, ``AdamW.step``; no
  proximal recompute (the current policy's detached log-probs stand in for it).

Both are timed alternately over ``--trials`` rounds after ``--warmup`` rounds; one JSON line:
figure = median trainer milliseconds, baseline = median plain milliseconds, ratio = baseline /
figure (higher is better; goal >= 0.77: the trainer's step within 1.3x the plain one).
``--profile`` prints cProfile's top functions of the trainer's step instead.

    python benchmarks/bench_train_step.py [--trials 30] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transport_report import at_least, load_warning  # noqa: E402 (beside this script)

GOAL = round(1 / 1.3, 2)  # ratio = plain / trainer: the trainer's step within 1.3x a plain one


def workload_batch(n_groups: int, group_size: int, max_new: int, seed: int = 0):
    """A batch shaped like the addition task's: prompts ``"ab+cd="`` (7 char tokens with BOS-less
    char tokenizer ids), outputs of 2..max_new tokens, random behaviour log-probs and 0/1
    rewards."""
    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(4, 100, 7)
        trajs = [Trajectory.of(prompt_ids=prompt, output_ids=rng.integers(4, 100, t),
                            behav_logp=-rng.random(t) * 3, versions=np.zeros(t, np.int32),
                            reward=float(rng.integers(0, 2)), finish_reason="stop")
                 for t in rng.integers(2, max_new + 1, group_size)]
        groups.append(TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g),
                                      prompt_index=g, epoch=0,
                                      trajectories=trajs))
    return groups_to_batch(groups)


class Plain:
    """The baseline: one unwrapped HF model and AdamW, a textbook PPO-clip step on the padded
    batch."""

    def __init__(self, cfg, batch):
        from areal_like.weights.hf import build_model

        self.model = build_model(cfg.model)
        self.model.train()
        t = cfg.trainer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                     weight_decay=t.weight_decay)
        self.temp, self.clip, self.grad_clip = cfg.task.temperature, 0.2, t.grad_clip
        b = batch
        t_max = b.mask.shape[1]
        self.pos = ((b.prompt_lens[:, None] - 1 + torch.arange(t_max))
                    .clamp(max=b.input_ids.shape[1] - 2))
        self.targets = b.input_ids.gather(1, self.pos + 1)
        r = b.rewards
        mean = (torch.zeros(int(b.group_ids.max()) + 1).index_add_(0, b.group_ids, r)
                / torch.bincount(b.group_ids))
        self.adv = (r - mean[b.group_ids])[:, None].expand_as(b.mask)
        self.batch = b

    def step(self) -> float:
        b = self.batch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=b.input_ids).logits.float() / self.temp
        logp_all = torch.log_softmax(
            logits.gather(1, self.pos[..., None].expand(-1, -1, logits.shape[-1])), -1)
        logp = logp_all.gather(-1, self.targets[..., None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        behav_w = torch.exp(logp.detach() - b.behav_logp).clamp(max=5.0)
        pg = -torch.minimum(ratio * self.adv,
                            ratio.clamp(1 - self.clip, 1 + self.clip) * self.adv) * behav_w
        loss = (pg * b.mask).sum() / b.mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        return float(loss)


def trainer_step(policy, batch, settings) -> dict:
    from trainer.step import recompute_prox_logp, train_step

    prox = recompute_prox_logp(policy, batch, settings)
    return train_step(policy, batch, settings, prox)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=at_least(1), default=30)
    ap.add_argument("--warmup", type=at_least(0), default=5)
    ap.add_argument("--groups", type=at_least(1), default=8)
    ap.add_argument("--max-new-tokens", type=at_least(1), default=8)
    ap.add_argument("--profile", action="store_true",
                    help="print cProfile's top functions of the trainer's step")
    ap.add_argument("overrides", nargs="*", help="config overrides for both (key=value)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from areal_like.settings.config import load_config
    from trainer.model import build_policy, init_distributed
    from trainer.step import StepSettings

    cfg = load_config(["model=tiny", "task=addition", "loss=decoupled_ppo", "trainer.lr=3e-5",
                       "trainer.skip_zero_advantage=false",  # every row, as the plain step computes
                       f"trainer.micro_batch_size={8 * args.groups}", *args.overrides])
    batch = workload_batch(args.groups, 8, args.max_new_tokens)
    init_distributed(cfg.trainer)
    policy, settings, plain = (build_policy(cfg.model, cfg.trainer), StepSettings.from_config(cfg),
                               Plain(cfg, batch))
    for _ in range(args.warmup):
        trainer_step(policy, batch, settings)
        plain.step()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.trials):
            trainer_step(policy, batch, settings)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        return
    times: dict[str, list[float]] = {"trainer": [], "plain": []}
    for _ in range(args.trials):
        for name, fn in (("trainer", lambda: trainer_step(policy, batch, settings)),
                         ("plain", plain.step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({
        **step_line(statistics.median(times["trainer"]), statistics.median(times["plain"])),
        "tokens": batch.n_tokens, "seqs": batch.n_seqs, "padded_shape": list(batch.input_ids.shape),
        "trials": args.trials, "overrides": args.overrides, **load_warning(),
    }))


def step_line(trainer_s: float, plain_s: float) -> dict:
    """The line's common keys: a step's seconds, the trainer's and the plain one's."""
    return {"name": "train_step_vs_plain_pytorch", "figure": round(trainer_s * 1e3, 2),
            "unit": "ms per step (median)", "baseline": round(plain_s * 1e3, 2),
            "ratio": round(plain_s / trainer_s, 3), "goal": GOAL}


if __name__ == "__main__":
    main()
