"""On-policy distillation against RL alone: held-out greedy accuracy of 2-digit addition.

Through the CLI, on CPU: the data and random-initialized tiny Qwen2 models as
``benchmarks/bench_sft_then_rl.py`` makes them; a teacher trained on the train rows by
``areal-like sft``, and a weaker student of the same shape and tokenizer trained for fewer steps;
then ``areal-like run experiment=distill_addition`` from
the student for N steps with the teacher (pure distillation), and, the baseline, the same recipe
without a teacher (RL on the task's exact-match reward) for 2N steps. One JSON line (figure: the
distilled student's final greedy accuracy; baseline: RL's after twice the steps; ratio:
figure / max(baseline, 1/512); goal: ratio >= 1 and the student better than it started), with
the teacher's own accuracy beside it.

    python -m benchmarks.bench_distill [--root DIR] [--teacher-steps 1500] [--student-steps 250]
        [--steps 50] [--lr 1e-4]
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
    ap.add_argument("--student-steps", type=int, default=250,
                    help="SFT steps that make the weaker student (0: the random model)")
    ap.add_argument("--steps", type=int, default=50, help="N: distillation steps (RL gets 2N)")
    ap.add_argument("--lr", type=float, default=1e-4, help="trainer.lr of both runs")
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_distill_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    train, held = addition_data(root)
    data = (f"task.dataset_path={train}", f"task.eval_path={held}")

    def sft(name: str, seed: int, steps: int) -> dict:
        return cli("sft", "experiment=distill_addition", "distill.teachers=[]",
                   f"model.path={make_model(root / (name + '_init'), seed=seed)}", *data,
                   f"warm_start.steps={steps}", f"warm_start.lr={args.teacher_lr}",
                   "--out", str(root / name), f"run_dir={root / 'runs' / name}")

    t0 = time.monotonic()
    teacher = sft("teacher", 1, args.teacher_steps)
    teacher_s = time.monotonic() - t0
    student = (sft("student", 0, args.student_steps)["model"] if args.student_steps
               else make_model(root / "student", seed=0))
    runs = {name: cli("run", "-q", "experiment=distill_addition", f"model.path={student}", *data,
                      f"trainer.lr={args.lr}", *extra, f"run_dir={root / 'runs' / name}")
            for name, extra in (
                ("distill", (f"distill.teachers=[{teacher['model']}]",
                             f"trainer.steps={args.steps}")),
                ("rl_only", ("distill.teachers=[]", f"trainer.steps={2 * args.steps}")))}
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
        "wall_s": {n: r["wall_s"] for n, r in runs.items()}, "root": str(root)}), flush=True)


if __name__ == "__main__":
    main()
