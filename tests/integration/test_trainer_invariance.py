"""The same batch gives the same loss, grad norm, stats and weights (1e-5) in any micro-batching.

Padded mbs 1 and 4, packed, token-budget (packed and padded), on 1 and 2 FSDP2 ranks (gloo), with
multi-turn loss masks; the reference is padded, one sequence per call. Not vacuous: packed
attention leaking across sequences fails the first packed case (ess_ratio 0.4322 vs 0.4398).
Workers run as ``python -c RUNNER test_trainer_invariance.py OUT_DIR``; AdamW eps=1e-3 keeps steps
linear.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# (name, overrides); every case runs in every layout of LAYOUTS (1 rank) and LAYOUTS_2 (2 ranks)
CASES = [
    ("decoupled_ppo", ["trainer.loss.kernel=decoupled_ppo", "trainer.loss.agg=token-mean"]),
    ("tis_rloo_tokensum", ["trainer.loss.kernel=tis", "trainer.estimator=rloo",
                           "trainer.loss.agg=seq-mean-token-sum"]),
    ("mis_reinforcepp", ["trainer.loss.kernel=mis", "trainer.estimator=reinforce_pp"]),
    ("icepop_rpp_baseline", ["trainer.loss.kernel=icepop",
                             "trainer.estimator=reinforce_pp_baseline"]),
    ("gspo", ["trainer.loss.kernel=gspo", "trainer.loss.agg=seq-mean-token-mean"]),
    ("vespo", ["trainer.loss.kernel=vespo"]),
    ("oapl", ["trainer.loss.kernel=oapl"]),
    ("grpo_seqmean_2mb", ["trainer.loss.kernel=ppo", "trainer.loss.agg=seq-mean-token-mean",
                          "trainer.num_minibatches=2"]),
    ("drgrpo_tokensum_norm", ["trainer.loss.kernel=ppo", "trainer.estimator=drgrpo",
                              # C = task.max_new_tokens
                              "trainer.loss.agg=seq-mean-token-sum-norm"]),
    ("vcpo", ["trainer.loss.kernel=vcpo", "trainer.loss.agg=seq-mean-token-mean"]),
    # groups 0 and 1 solved (SOLVED): the first minibatch has no row to train and runs one at zero
    # weight (trainer/step.py trained_rows), the second trains only its unsolved rows
    ("vespo_2mb_solved", ["trainer.loss.kernel=vespo", "trainer.num_minibatches=2"]),
]
SOLVED = {"vespo_2mb_solved": 2}  # case -> how many leading groups get reward 1 on every sample
BUDGET = "trainer.max_tokens_per_micro_batch"
# packed in every minibatch (the default packs only where padding would waste 15%)
PACKED = ("trainer.pack_sequences=true", "trainer.pack_min_padding=0")
REFERENCE = ("padded mbs=1", ["trainer.pack_sequences=false", "trainer.micro_batch_size=1"])
LAYOUTS = [REFERENCE,  # (label, overrides) run on one rank; the first is the reference
           ("padded mbs=4", ["trainer.pack_sequences=false", "trainer.micro_batch_size=4"]),
           ("packed mbs=4", [*PACKED, "trainer.micro_batch_size=4"]),
           ("packed 24 tokens", [*PACKED, f"{BUDGET}=24"]),
           ("padded 24 tokens", ["trainer.pack_sequences=false", f"{BUDGET}=24"])]
LAYOUTS_2 = [("padded mbs=2", ["trainer.pack_sequences=false", "trainer.micro_batch_size=2"]),
             ("packed mbs=2", [*PACKED, "trainer.micro_batch_size=2"]),
             ("packed 24 tokens", [*PACKED, f"{BUDGET}=24"])]
# what a layout sets: every one of them, whatever its overrides name (load_config sets
# max_tokens_per_micro_batch=0 with micro_batch_size)
LAYOUT_KEYS = ("pack_sequences", "pack_min_padding", "micro_batch_size",
               "max_tokens_per_micro_batch")
# two cold torch+transformers imports and 11 cases x 5 layouts of steps on a loaded 2-core machine
# (~40 s alone; 155 s at a load average of 13)
WORKER_TIMEOUT_S = 480


def synthetic_groups(n_groups: int = 4, group_size: int = 4, seed: int = 0, version: int = 0,
                     solved: int = 0):
    import numpy as np

    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        trajs = []
        for _ in range(group_size):
            p, t = int(rng.integers(2, 7)), int(rng.integers(1, 9))
            # a multi-turn episode's context tokens (mask 0) sit between generated turns
            mask = np.ones(t, np.int32) if t < 5 else np.array([1, 1, 0, 0] + [1] * (t - 4))
            trajs.append(Trajectory.of(prompt_ids=rng.integers(4, 100, p),
                                    output_ids=rng.integers(4, 100, t),
                                    behav_logp=-rng.random(t) * 5,
                                    versions=np.full(t, version, np.int32),
                                    reward=max(float(rng.integers(0, 2)), float(g < solved)),
                                    finish_reason="stop",
                                    loss_mask=mask))
        groups.append(TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g),
                                      prompt_index=g, epoch=0,
                                      trajectories=trajs))
    return groups


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    layouts = LAYOUTS_2 if os.environ.get("WORLD_SIZE") == "2" else LAYOUTS
    # composed once per case and once per layout (a composition is ~0.6 CPU-s, 55 of them were
    # most of the worker's time), then the layout's keys set on the case's trainer, validated again
    # by replace; the same config as composing both override lists at once
    assert all(ov.partition("=")[0].removeprefix("trainer.") in LAYOUT_KEYS
               for _, layout in layouts for ov in layout), layouts
    shapes = {label: load_config(layout).trainer for label, layout in layouts}
    results = {}
    for name, overrides in CASES:
        batch = groups_to_batch(synthetic_groups(solved=SOLVED.get(name, 0)))
        case = load_config(["trainer.lr=1e-2", "trainer.grad_clip=1e9", *overrides])
        for label, _ in layouts:
            shape = {k: getattr(shapes[label], k) for k in LAYOUT_KEYS}
            cfg = replace(case, trainer=replace(case.trainer, **shape))
            rank, _ = init_distributed(cfg.trainer)
            policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
            if "init" not in results:  # (setdefault would gather the whole model every time)
                results["init"] = full_state_dict(policy.model)
            s = StepSettings.from_config(cfg)
            stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
            results[(name, label)] = {"stats": stats, "state": full_state_dict(policy.model)}
    if rank == 0:
        torch.save(results, out_dir / "res.pt")
    leave_distributed()


@pytest.mark.timeout(WORKER_TIMEOUT_S + 60)
def test_loss_stats_and_weights_invariant_to_layout_and_ranks(tmp_path, spawn_python, free_port):
    import torch

    from trainer.step import LAYOUT_STATS

    one, two = (torch.load(d / "res.pt") for d in spawn_python.one_and_two_ranks(
        RUNNER, __file__, tmp_path, free_port(), WORKER_TIMEOUT_S))
    for name, _ in CASES:
        ref = one[(name, REFERENCE[0])]
        others = ([(label, one[(name, label)]) for label, _ in LAYOUTS[1:]]
                  + [(f"2 ranks, {label}", two[(name, label)]) for label, _ in LAYOUTS_2])
        kernel_stats = sorted(k for k in ref["stats"] if k not in LAYOUT_STATS)
        for label, got in others:
            for k in kernel_stats:  # loss, grad_norm, lr and every kernel stat
                want = pytest.approx(ref["stats"][k], rel=1e-5, abs=1e-6)
                assert got["stats"][k] == want, (name, label, k)
            assert got["stats"]["seq_tokens"] == ref["stats"]["seq_tokens"], (name, label)
            if "packed" in label:  # no padding computed
                assert got["stats"]["padding_share"] == 0.0, (name, label)
            for key, w in ref["state"].items():
                torch.testing.assert_close(got["state"][key], w, rtol=0, atol=1e-5,
                                           msg=f"{name} {label} {key}")
        # not vacuous: the first minibatch trained no row, the second all of its rows
        if name in SOLVED:
            assert ref["stats"]["zero_adv_skip_frac"] == 0.5, name
        # the comparison is not vacuous: the step moved the weights by far more than the tolerance
        moved = max(float((w - one["init"][k]).abs().max()) for k, w in ref["state"].items())
        assert moved > 1e-3, (name, moved)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
