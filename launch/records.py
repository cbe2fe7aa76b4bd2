"""What a run leaves in its directory, read back (``metrics/trainer.jsonl``, ``eval.jsonl``), and
what is made of it at the end: ``summary.json`` and ``learning_curve.png``.

Readers only, safe during the job: a JSONL line being written is skipped, and a step or version
that appears twice (a resume replays a step) counts once, the last record winning.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from launch.local import write_json_atomic
from launch.topology import wants_eval
from launch.track_sink import JsonlTail

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from areal_like.settings.config import RunConfig

SUMMARY_WINDOW = 5  # "first / last few steps" for reward_first / reward_last


def read_jsonl(path: Path, since: int = 0) -> list[dict]:
    """The records of a JSONL file's complete lines from byte offset ``since`` on."""
    return JsonlTail(path, since).read()


def reward_of(rec: dict) -> float | None:
    """The mean task reward of one trainer step record (trainer/loop.py writes ``reward_mean``)."""
    reward = rec.get("reward_mean")
    return float(reward) if isinstance(reward, (int, float)) else None


def trainer_jsonl(run_dir: Path) -> Path:
    return run_dir / "metrics" / "trainer.jsonl"


def step_of(rec: dict) -> int | None:
    """The step of a trainer step record (one with a reward); None for any other record."""
    step = rec.get("step")
    return step if isinstance(step, int) and reward_of(rec) is not None else None


def last_per(recs: list[dict], key) -> list[dict]:
    """One record per ``key(rec)`` (None: skipped), in its order; the last one wins."""
    by_key = {k: rec for rec in recs if (k := key(rec)) is not None}
    return [by_key[k] for k in sorted(by_key)]


def step_records(run_dir: Path, since: int = 0) -> list[dict]:
    """One record per trainer step written from byte ``since`` of trainer.jsonl on (0: the whole
    run; the size at start: this invocation's steps); the last one wins after a resume replays a
    step."""
    return last_per(read_jsonl(trainer_jsonl(run_dir), since), step_of)


def eval_summary(run_dir: Path) -> dict:
    """The first and last evaluation of the run, for the summary line; ``eval_first`` only when
    there was an earlier one than the last (with one evaluation it would repeat ``eval_last``)."""
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    out = {"eval_last": {k: v for k, v in last.items() if k != "time"}}
    if len(evals) > 1:
        out = {"eval_first": {"policy_version": first["policy_version"],
                              "greedy_accuracy": first["greedy_accuracy"]}, **out}
    return out


def summarize(run_dir: Path, wall_s: float, code: int, since: int = 0,
              resumed_from: int = 0, trainer_steps: int | None = None,
              checkpoint: str | None = None) -> dict:
    """The run's summary: rewards and steps of this invocation (trainer.jsonl from byte ``since``),
    ``resumed_from`` when it continued a checkpoint; how it ended (``outcome``), at which
    ``policy_version`` of ``trainer_steps``, and its newest ``checkpoint``; the learning curve
    shows the whole run."""
    recs = step_records(run_dir, since)
    rewards = [reward_of(r) for r in recs]
    first, last = rewards[:SUMMARY_WINDOW], rewards[-SUMMARY_WINDOW:]
    summary = {
        "reward_first": round(sum(first) / len(first), 4) if first else None,
        "reward_last": round(sum(last) / len(last), 4) if last else None,
        "steps": len(recs), "wall_s": round(wall_s, 1), "run_dir": str(run_dir),
        **outcome(run_dir, code, since),
        # the step reached: this invocation's last step, else where it resumed
        "policy_version": recs[-1].get("policy_version", resumed_from) if recs else resumed_from,
        "trainer_steps": trainer_steps,
        "checkpoint": checkpoint,
    }
    summary.update(eval_summary(run_dir))
    if resumed_from:
        summary["resumed_from"] = resumed_from
    history = step_records(run_dir)
    if history:
        summary["learning_curve"] = str(plot_curve(run_dir, history))
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def outcome(run_dir: Path, code: int, since: int = 0) -> dict:
    """``ok`` is true only when the job exited cleanly and the trainer's last record of this
    invocation says it finished (``event: done``) at ``trainer.steps`` or beyond; with what crashes
    cost: ``rolled_back_steps`` (steps lost and trained again, the run's total), ``steps_trained``
    (optimizer steps the final weights hold: the final version less the labels resumes skipped),
    ``nonfinite_skipped`` (optimizer steps of the last trainer process not applied: non-finite),
    ``batches_quarantined`` when any (batches whose step raised, skipped)."""
    done = [r for r in read_jsonl(trainer_jsonl(run_dir), since)
            if r.get("event") in ("done", "resume")]
    last = next((r for r in reversed(done) if r["event"] == "done"), None)
    out = {"ok": code == 0 and last is not None and last["policy_version"] >= last["steps"]}
    # how it ended (summary.json's ``end``): completed (ok); stopped, by a signal (exit 128 + it) or
    # with its trainer stopped before trainer.steps (exit 0); failed
    end = "completed" if out["ok"] else "stopped" if code == 0 or code > 128 else "failed"
    out.update(end=end, exit_code=code)
    if last is not None:
        out.update(steps_trained=last["steps_trained"], rolled_back_steps=last["rolled_back_steps"],
                   nonfinite_skipped=last["nonfinite_skipped"])
        if last.get("batches_quarantined"):  # batches whose step raised, skipped (trainer/data.py)
            out["batches_quarantined"] = last["batches_quarantined"]
    elif done:
        out["rolled_back_steps"] = done[-1].get("rolled_back_total", 0)
    # whether the last trainer process had a learning signal (``ok`` false after
    # trainer.learning_watch_steps steps in a row without one: trainer/learning_watch.py)
    if last is not None and last.get("learning") is not None:  # None: the watch is off
        out["learning"] = last["learning"]
    return out


def trainer_done(run_dir: Path) -> dict | None:
    """The trainer's ``done`` record when it is the last record of trainer.jsonl (read from the
    file's end): where a job started without ``areal-like run`` (Slurm, by hand), which writes no
    summary.json, ends; its ``policy_version`` below its ``steps`` when it was stopped."""
    try:
        with trainer_jsonl(run_dir).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            last = json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):  # none yet, or its last line is being written
        return None
    return last if isinstance(last, dict) and last.get("event") == "done" else None


def has_final_eval(run_dir: Path, steps: int) -> bool:
    """Whether ``eval.jsonl`` holds the final evaluation of the version ``steps`` (a run resumed
    with more steps holds the earlier run's too)."""
    return any(r.get("final") and r.get("policy_version") == steps
               for r in read_jsonl(run_dir / "eval.jsonl"))


def job_over(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the job of ``run_dir`` is over: ``areal-like run`` wrote summary.json, or the
    trainer is done (``trainer_done``) and the final evaluation ``cfg`` schedules is written."""
    if (run_dir / "summary.json").exists():
        return True
    final = wants_eval(cfg) and cfg.eval.at_end
    return trainer_done(run_dir) is not None and (
        not final or has_final_eval(run_dir, cfg.trainer.steps))


def eval_records(run_dir: Path) -> list[dict]:
    """One ``eval.jsonl`` record per evaluated policy version (the last one wins)."""
    return last_per(read_jsonl(run_dir / "eval.jsonl"),
                    lambda rec: v if isinstance(v := rec.get("policy_version"), int) else None)


def curve_figure(run_dir: Path, recs: list[dict], evals: list[dict]) -> Figure:
    """Reward per step and its running mean; eval accuracies (greedy, mean@k) as points at their
    policy version, which is the trainer step that produced those weights."""
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no GUI backend

    steps = [r["step"] for r in recs]
    rewards = [reward_of(r) for r in recs]
    k = max(1, min(SUMMARY_WINDOW, len(rewards)))
    windows = [rewards[max(0, i - k + 1):i + 1] for i in range(len(rewards))]
    smooth = [sum(w) / len(w) for w in windows]
    fig = Figure(figsize=(6, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, rewards, alpha=0.35, label="reward (per step)")
    ax.plot(steps, smooth, label=f"reward ({k}-step mean)")
    samples_k = next((e["k"] for e in reversed(evals) if isinstance(e.get("k"), int)), "k")
    for key, label, marker in (("greedy_accuracy", "eval accuracy (greedy)", "o"),
                               (f"mean@{samples_k}", f"eval mean@{samples_k}", "s")):
        points = [(e["policy_version"], float(e[key])) for e in evals
                  if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle=":", label=label)
    ax.set_xlabel("trainer step (policy version)")
    ax.set_ylabel("mean task reward / eval accuracy" if evals else "mean task reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    # below the plot, never over it: inside the axes it hid the late eval points wherever it sat
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small",
              frameon=False)
    ax.set_title(run_dir.name)
    fig.tight_layout()
    return fig


def warm_plotting() -> threading.Thread:
    """Import what ``plot_curve`` needs in a background thread (~0.4 s of CPU), started when the
    trainer is done: the import overlaps the final evaluation instead of following it."""
    def load() -> None:
        import matplotlib.backends.backend_agg  # noqa: F401 - Figure.savefig's PNG canvas
        import matplotlib.figure  # noqa: F401

    thread = threading.Thread(target=load, name="warm-plotting", daemon=True)
    thread.start()
    return thread


def plot_curve(run_dir: Path, recs: list[dict]) -> Path:
    """``<run_dir>/learning_curve.png`` from the step records and ``eval.jsonl`` (when present)."""
    path = run_dir / "learning_curve.png"
    curve_figure(run_dir, recs, eval_records(run_dir)).savefig(path)
    return path
