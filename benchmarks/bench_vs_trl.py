"""Against the synchronous peer on its own ground: areal-like versus TRL's GRPOTrainer, one machine.

The workload (configs/experiment/bench_vs_trl.yaml): a tiny Qwen2 (~0.5M parameters, char
tokenizer) on 2-digit addition, 8 prompts x 8 samples per step, at most 8 new tokens,
temperature 1, lr 3e-5, both systems starting from the SAME warm-started model (trained once,
cached), and the same RL wall budget (``--budget-s``, default 180 s; ``--quick`` 60 s). On the
same cores (the first two this process may use), one after the other, never concurrently:

* ours at eta = 0 and at eta = 4: the real system (buffer, rollout server with the embedded
  engine, a one-rank trainer; the laptop topology lays them out on the cores and pins them;
  the reward scored in the rollout server's own process, ``task.reward_workers=0``, as TRL scores
  in its training process),
  stopped when the budget is spent; the trainer's graceful stop saves a checkpoint, which is
  exported to a Hugging Face directory and evaluated. The budget starts when the trainer is
  ready to train (its log-prob guard record, after the initial weight push): process start-up
  is not counted, as TRL's model loading is not;
* TRL: ``GRPOTrainer`` with a custom exact-match reward, ``use_vllm=False``, generation in the
  same process, on CPU with one thread per core; the budget starts at ``on_train_begin`` and
  a callback stops training at the first step end past it.

Trained samples/s = samples trained / (end of the last step - start of the budget). Held-out
accuracy = greedy exact match on the first ``--eval-prompts`` prompts of the task's eval split,
with one scorer (``launch.warmstart.evaluate``, which also gives the sampled accuracy at the task
temperature) for the warm start and every final model.

One JSON line per eta: figure = our samples/s, baseline = TRL's, ratio = figure / baseline
(goal >= 1.0), with the greedy accuracies (ours, TRL's, the warm start's). TRL is the optional
extra ``trl`` (``pip install areal-like[trl]``); without it the lines still come, with our side
measured, baseline null and a message saying what is missing. On a loaded machine (load average
above the cores) the lines carry a warning.

    python benchmarks/bench_vs_trl.py [--quick] [--budget-s 180] [--eval-prompts 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from areal_like.settings.config import RunConfig, load_config  # noqa: E402
from areal_like.tasks.task import Example, exact_match, make_task  # noqa: E402
from launch.job import job_specs, prepare  # noqa: E402
from launch.local import Supervisor  # noqa: E402
from launch.records import read_jsonl, step_records, trainer_jsonl  # noqa: E402
from launch.warmstart import ensure_warm_start, evaluate  # noqa: E402

ETAS = (0, 4)
TRL_MISSING = "TRL is not installed: pip install 'areal-like[trl]' (the optional extra `trl`) to measure the baseline"


# ---------------------------------------------------------------- pure pieces (tests/unit/test_bench_vs_trl.py)
def exact_match_rewards(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """TRL's reward-function signature (completions, then the dataset's columns by name), scored by
    the task's own reward: the same exact match our rollout servers use."""
    return [exact_match(c, Example("", a)) for c, a in zip(completions, answer, strict=True)]


def rl_throughput(records: list[dict], start: float) -> tuple[float, int, float]:
    """(samples/s, samples, seconds) of our run from ``start`` (the trainer ready to train) to the
    end of its last step, from the trainer's step records (``time``, ``seqs``)."""
    if not records:
        raise ValueError("no trainer step was recorded within the budget")
    samples = sum(int(r["seqs"]) for r in records)
    seconds = records[-1]["time"] - start
    if seconds <= 0:
        raise ValueError(f"the last step ends {seconds:.3f}s after the start of the budget")
    return samples / seconds, samples, seconds


def rl_start(trainer_rows: list[dict]) -> float | None:
    """When our trainer was ready to train: its log-prob guard record, written after the initial push."""
    return next((r["time"] for r in trainer_rows if r.get("event") == "logprob_guard"), None)


# ---------------------------------------------------------------- shared setup
def workload(run_dir: Path, eta: int = 0) -> RunConfig:
    return load_config(["experiment=bench_vs_trl", f"buffer.max_staleness={eta}", f"run_dir={run_dir}"])


def heldout(model, cfg: RunConfig, n: int) -> dict:
    """Greedy (and sampled) accuracy on the first ``n`` eval-split prompts, one scorer for everyone."""
    from areal_like.tasks.tokenizer import load_tokenizer

    task = make_task(cfg.task, split="eval")
    idx = list(range(min(n, len(task))))
    greedy, sampled = evaluate(model.eval(), load_tokenizer(cfg.model), task, idx, cfg.task.max_new_tokens,
                               cfg.task.temperature)
    return {"greedy": round(greedy, 4), "sampled": round(sampled, 4), "prompts": len(idx)}


def load_hf(cfg: RunConfig, path: str | Path):
    from areal_like.weights.hf import build_model

    return build_model(dataclasses.replace(cfg.model, path=str(path)), "cpu", "float32")


# ---------------------------------------------------------------- ours
def run_ours(root: Path, eta: int, warm: str, cpus: list[int], budget_s: float, eval_n: int) -> dict:
    run_dir = root / f"ours_eta{eta}"
    cfg = workload(run_dir, eta)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=warm),
                              warm_start=dataclasses.replace(cfg.warm_start, steps=0))
    cfg, topo, path = prepare(cfg, cpus=cpus)
    jsonl = trainer_jsonl(run_dir)

    start: float | None = None  # the log-prob guard's time, read once: re-reading the growing records
    # every tick cost this process up to 66 ms of CPU per half second (a 180 s run's), on the job's cores

    def stop_when_spent(sup: Supervisor) -> None:
        nonlocal start
        if start is None:
            start = rl_start(read_jsonl(jsonl))
        if start is not None and time.time() - start >= budget_s:
            sup.request_stop()

    sup = Supervisor(job_specs(cfg, topo, path), run_dir, restarts=0, health_timeout_s=300,
                     echo=lambda _: None, on_tick=stop_when_spent)
    sup.run()
    rows = read_jsonl(jsonl)
    start, recs = rl_start(rows), step_records(run_dir)
    if start is None or not recs:
        raise SystemExit(f"eta={eta}: the run trained nothing ({sup.outcome}); logs in {run_dir / 'logs'}")
    sps, samples, seconds = rl_throughput(recs, start)
    export = run_dir / "final_hf"
    subprocess.run([sys.executable, "-m", "trainer.export", str(run_dir / "checkpoints"), str(export),
                    "--config-file", str(path)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    saved = sorted(int(p.name[1:]) for p in (run_dir / "checkpoints").glob("v*") if p.name[1:].isdigit())
    return {"samples_per_s": round(sps, 2), "samples": samples, "steps": len(recs), "rl_seconds": round(seconds, 1),
            "steps_per_s": round(len(recs) / seconds, 3), "last_step_version": recs[-1]["policy_version"], "checkpoint_version": saved[-1] if saved else None,
            "staleness_mean": round(sum(r["staleness_mean"] for r in recs) / len(recs), 2),
            "accuracy": heldout(load_hf(cfg, export), cfg, eval_n)}


# ---------------------------------------------------------------- TRL
def run_trl(root: Path, warm: str, cpus: list[int], budget_s: float, eval_n: int, seed: int) -> dict:
    """TRL's GRPOTrainer on the same workload, in this process pinned to ``cpus``."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from areal_like.tasks.tokenizer import load_tokenizer

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    cfg = workload(root / "trl")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=warm))
    t = cfg.task
    task = make_task(t)
    rows = [task.example(i) for i in range(min(len(task), 20_000))]
    data = Dataset.from_list([{"prompt": ex.prompt, "answer": ex.answer} for ex in rows])
    ends: list[float] = []

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.time())  # ends[0] = start of the budget

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.time())
            if ends[-1] - ends[0] >= budget_s:
                control.should_training_stop = True

    prompts_per_step = cfg.buffer.groups_per_step
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=prompts_per_step * t.group_size,
                      num_generations=t.group_size, max_completion_length=t.max_new_tokens,
                      temperature=t.temperature, learning_rate=cfg.trainer.lr, use_vllm=False, use_cpu=True,
                      max_steps=10**6, save_strategy="no", report_to="none", logging_steps=10**6,
                      disable_tqdm=True, seed=seed, bf16=False)
    trainer = GRPOTrainer(model=load_hf(cfg, warm), reward_funcs=exact_match_rewards, args=args,
                          train_dataset=data, processing_class=load_tokenizer(cfg.model),
                          callbacks=[Budget()])
    with contextlib.redirect_stdout(sys.stderr):  # its end-of-training dict would break the JSON lines
        trainer.train()
    steps = len(ends) - 1
    seconds = ends[-1] - ends[0]
    samples = steps * prompts_per_step * t.group_size
    return {"samples_per_s": round(samples / seconds, 2), "samples": samples, "steps": steps,
            "rl_seconds": round(seconds, 1), "steps_per_s": round(steps / seconds, 3),
            "accuracy": heldout(trainer.model, cfg, eval_n)}


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=180.0, help="RL wall budget per system and eta")
    ap.add_argument("--quick", action="store_true", help="a 60 s budget and 128 held-out prompts")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="keep every run directory under this path")
    args = ap.parse_args()
    budget, eval_n = (60.0, 128) if args.quick else (args.budget_s, args.eval_prompts)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        raise SystemExit("needs 2 cores: the laptop topology splits them between generation and training")
    t0 = time.monotonic()
    version = trl_version()
    if version is None:
        print(f"[bench_vs_trl] {TRL_MISSING}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)
        taken = [str(root / d) for d in (*(f"ours_eta{e}" for e in ETAS), "trl") if (root / d).exists()]
        if taken:  # a trainer would resume the old checkpoint and the export refuses an existing directory
            raise SystemExit(f"--keep {root}: {', '.join(taken)} exist from an earlier run; choose a new directory "
                             "(copy its warmstart/ there to reuse the warm start)")
        # the warm start is cached beside the runs (warm_start.cache_dir): a rerun with --keep reuses it
        warm_cfg = ensure_warm_start(workload(root / "warm"), log=lambda m: print(f"[warm-start] {m}", file=sys.stderr))
        warm = warm_cfg.model.path
        start_acc = heldout(load_hf(warm_cfg, warm), warm_cfg, eval_n)
        ours = {}
        for eta in ETAS:
            ours[eta] = run_ours(root, eta, warm, cpus, budget, eval_n)
            print(f"[bench_vs_trl] ours eta={eta}: {json.dumps(ours[eta])}", file=sys.stderr, flush=True)
        trl = run_trl(root, warm, cpus, budget, eval_n, args.seed) if version else None
        if trl:
            print(f"[bench_vs_trl] TRL {version}: {json.dumps(trl)}", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    warning = (f"machine loaded: load average {load:.1f} on {os.cpu_count()} cores; figures are not a quiet "
               "machine's" if load > (os.cpu_count() or 1) else None)
    if warning:
        print(f"[bench_vs_trl] WARNING: {warning}", file=sys.stderr)
    for eta in ETAS:
        o = ours[eta]
        base = trl["samples_per_s"] if trl else None
        print(json.dumps({
            "name": f"vs_trl_samples_per_s_eta{eta}", "figure": o["samples_per_s"], "unit": "trained samples/s",
            "baseline": base, "ratio": round(o["samples_per_s"] / base, 3) if base else None, "goal": 1.0,
            "accuracy_greedy": o["accuracy"]["greedy"],
            "accuracy_greedy_trl": trl["accuracy"]["greedy"] if trl else None,
            "accuracy_greedy_start": start_acc["greedy"], "accuracy_goal": ">= TRL's",
            "ours": o, "trl": trl, "start": start_acc, "trl_version": version, "budget_s": budget,
            "cpus": cpus, "load_avg": round(load, 2), "warning": warning,
            "missing": None if trl else TRL_MISSING, "wall_s": round(time.monotonic() - t0, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
