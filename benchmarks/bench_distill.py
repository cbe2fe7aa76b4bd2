"""On-policy distillation against RL alone: held-out greedy accuracy of 2-digit addition.

Through the CLI, on CPU: the data and a random-initialized tiny Qwen2 as
``benchmarks/bench_sft_then_rl.py`` makes them; from that one initialization, a teacher trained on
the train rows by ``areal-like sft``, and a weaker student: the same SFT stopped earlier (one
lineage, as a quickstart model trained further is the teacher of where it was); then
``areal-like run experiment=distill_addition`` from
the student for N steps with the teacher (pure distillation), and, the baseline, the same recipe
without a teacher (RL on the task's exact-match reward) for 2N steps. One JSON line (figure: the
distilled student's final greedy accuracy; baseline: RL's after twice the steps; ratio:
figure / max(baseline, 1/512); goal: ratio >= 1 and the student better than it started), with
the teacher's own accuracy and the sampled reverse KL (first and last 5 steps) beside it, and
``ROOT/learning_curves.png`` (and ``ROOT/curves.jsonl``): both runs' reward per step and their
held-out greedy accuracy.

Both runs share every setting but the teacher: ``trainer.lr`` (``--lr``), the seed, the batch and
``buffer.max_staleness`` (``--staleness``, 0 by default: the teacher's term takes the behaviour
log-prob as the student's, exact on-policy; in one run at 4 and lr 5e-4, with the policy moving
fast, the distilled student's reverse KL rose). The default student (300 SFT steps, greedy about
0.05) leaves room to learn where an exact-match reward is rare. A rerun with the same ``--root``
reuses its teacher and student (``ROOT/teacher-STEPS-lrLR``, ``ROOT/student-STEPS-lrLR``) and runs
only the two jobs, each in a new run directory. Trailing ``KEY=VALUE`` overrides go to both runs.

    python -m benchmarks.bench_distill [--root DIR] [--teacher-steps 1500] [--student-steps 300]
        [--steps 50] [--lr 5e-4] [--staleness 0] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.bench_sft_then_rl import EVAL_ROWS, addition_data, cli, make_model

GOAL = 1.0  # on the ratio: distilled for N steps at least as accurate as RL for 2N


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="working directory (default: a new temporary one)")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--student-steps", type=int, default=300,
                    help="steps of the teacher's SFT that make the weaker student (0: the "
                         "random model they both start from)")
    ap.add_argument("--steps", type=int, default=50, help="N: distillation steps (RL gets 2N)")
    ap.add_argument("--lr", type=float, default=5e-4, help="trainer.lr of both runs")
    ap.add_argument("--staleness", type=int, default=0,
                    help="buffer.max_staleness of both runs (0: on-policy; the teacher's term "
                         "takes the behaviour log-prob as the student's, exact on-policy)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the models' initialization (an existing ROOT/init is reused)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides for both runs (e.g. distill.kl_baseline=none)")
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_distill_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    train, held = addition_data(root)
    data = (f"task.dataset_path={train}", f"task.eval_path={held}")

    def sft(name: str, steps: int) -> dict:
        """``ROOT/NAME-STEPS-lrLR``: SFT from the initialization, or the one a run before left."""
        out = root / f"{name}-{steps}-lr{args.teacher_lr:g}"
        if (out / "warm_start.json").exists():  # a rerun on this root: only the two runs again
            return json.loads((out / "warm_start.json").read_text()) | {"model": str(out)}
        return cli("sft", "experiment=distill_addition", "distill.teachers=[]",
                   f"model.path={init}", *data,
                   f"warm_start.steps={steps}", f"warm_start.lr={args.teacher_lr}",
                   "--out", str(out), f"run_dir={root / 'runs' / out.name}")

    init = root / "init" if (root / "init").exists() else make_model(root / "init", args.seed)
    t0 = time.monotonic()
    teacher = sft("teacher", args.teacher_steps)
    teacher_s = time.monotonic() - t0
    student = sft("student", args.student_steps)["model"] if args.student_steps else init
    run_dirs = _fresh(root / "runs", ("distill", "rl_only"))
    runs = {name: cli("run", "-q", "experiment=distill_addition", f"model.path={student}", *data,
                      f"trainer.lr={args.lr}", f"buffer.max_staleness={args.staleness}",
                      *args.overrides, *extra,
                      f"run_dir={run_dirs[name]}")
            for name, extra in (
                ("distill", (f"distill.teachers=[{teacher['model']}]",
                             f"trainer.steps={args.steps}")),
                ("rl_only", ("distill.teachers=[]", f"trainer.steps={2 * args.steps}")))}
    curves = learning_curves(root, run_dirs, runs)
    kl = curves["distill"]["reverse_kl"]
    figure = runs["distill"]["eval_last"]["greedy_accuracy"]
    baseline = runs["rl_only"]["eval_last"]["greedy_accuracy"]
    print(json.dumps({
        "name": "distill_vs_rl_addition2", "figure": figure, "unit": "held-out greedy accuracy",
        "baseline": baseline, "ratio": round(figure / max(baseline, 1 / EVAL_ROWS), 2),
        "goal": GOAL,
        # and the distilled student better than it started
        "passed": (figure / max(baseline, 1 / EVAL_ROWS) >= GOAL
                   and figure > runs["distill"]["eval_first"]["greedy_accuracy"]),
        "teacher": {"greedy_acc": teacher.get("greedy_acc"), "steps": args.teacher_steps,
                    "wall_s": round(teacher_s, 1)},
        "steps": {"distill": args.steps, "rl_only": 2 * args.steps},
        "version0_greedy": {n: r.get("eval_first", {}).get("greedy_accuracy")
                            for n, r in runs.items()},
        "student_steps": args.student_steps, "lr": args.lr,
        "staleness": args.staleness, "overrides": args.overrides,
        # the sampled reverse KL to the teacher, nats per token: it falls as the student learns
        "reverse_kl": {"first5": _mean(kl[:5]), "last5": _mean(kl[-5:])},
        "plot": curves["plot"],
        "wall_s": {n: r["wall_s"] for n, r in runs.items()}, "root": str(root),
        "runs": {n: str(d) for n, d in run_dirs.items()}}), flush=True)


def _fresh(parent: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """A run directory per name under ``parent`` that no earlier run on this root used
    (``NAME``, else ``NAME.2``, ``NAME.3``...): a run never resumes another's checkpoint."""
    k = 1
    while any((parent / (n if k == 1 else f"{n}.{k}")).exists() for n in names):
        k += 1
    return {n: parent / (n if k == 1 else f"{n}.{k}") for n in names}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def learning_curves(root: Path, run_dirs: dict[str, Path], runs: dict[str, dict]) -> dict:
    """Each run's reward per step and sampled reverse KL (``metrics/trainer.jsonl``) and its
    held-out greedy accuracy at version 0 and at the end: ``ROOT/curves.jsonl`` (a line per run)
    and ``ROOT/learning_curves.png`` (when matplotlib is installed; ``plot`` None else)."""
    curves: dict = {}
    for name, run_dir in run_dirs.items():
        steps, reward, kl = [], [], []
        for line in (run_dir / "metrics" / "trainer.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "step" not in rec or "stats" not in rec:
                continue
            steps.append(rec["step"])
            reward.append(rec.get("reward_mean"))
            if "distill_reverse_kl" in rec["stats"]:
                kl.append(rec["stats"]["distill_reverse_kl"])
        evals = [(r["policy_version"], r["greedy_accuracy"])
                 for r in (runs[name].get("eval_first"), runs[name].get("eval_last")) if r]
        curves[name] = {"run": name, "step": steps, "reward_mean": reward, "reverse_kl": kl,
                        "greedy_accuracy": evals}
    (root / "curves.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curves.values()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        curves["plot"] = None
        return curves
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, c), color in zip(((n, curves[n]) for n in run_dirs), ("C0", "C1")):
        ax.plot(c["step"], c["reward_mean"], color=color, alpha=0.35, lw=1,
                label=f"{name}: sampled reward per step")
        if c["greedy_accuracy"]:
            xs, ys = zip(*c["greedy_accuracy"])
            ax.plot(xs, ys, "o-", color=color, lw=2, label=f"{name}: held-out greedy accuracy")
        if c["reverse_kl"]:
            ax_kl.plot(c["step"][:len(c["reverse_kl"])], c["reverse_kl"], color=color, label=name)
    ax.set_xlabel("trainer step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax_kl.set_xlabel("trainer step")
    ax_kl.set_ylabel("sampled reverse KL to the teacher (nats/token)")
    ax_kl.legend(fontsize=8)
    fig.suptitle("2-digit addition: distillation for N steps vs RL for 2N")
    fig.tight_layout()
    curves["plot"] = str(root / "learning_curves.png")
    fig.savefig(curves["plot"], dpi=100)
    plt.close(fig)
    return curves


if __name__ == "__main__":
    main()
