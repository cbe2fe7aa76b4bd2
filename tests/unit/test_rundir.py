"""A run_dir run again: finished is refused, unfinished resumes; checkpoints as trainer writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from areal_like.settings.config import ConfigError, load_config
from launch.job import on_trainer_done, plan_job, write_ports
from launch.records import curve_figure, eval_summary, summarize
from launch.rundir import (
    JOB_FILE,
    SETTINGS_FILE,
    changed_settings,
    check_existing_run,
    check_resume_settings,
    latest_checkpoint_step,
    lock_run_dir,
    read_job,
    write_job,
    write_settings,
)
from tests.conftest import REPO_ROOT, child_env, run_cli


def checkpoint(root: Path, step: int, complete: bool = True) -> None:
    d = root / f"v{step:08d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"")
    if complete:
        (d / "meta.pt").write_bytes(b"")


def run_again(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    r = run_cli("run", "-q", f"run_dir={tmp_path}", *overrides, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "[warm-start]" not in r.stderr, r.stderr
    return r


def test_latest_complete_checkpoint_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint_step(root) is None
    checkpoint(root, 50)
    checkpoint(root, 100)
    checkpoint(root, 120, complete=False)  # interrupted before meta.pt: not a checkpoint
    (root / ".tmp_v00000150").mkdir()
    (root / "vnotes").mkdir()
    assert latest_checkpoint_step(root) == 100


def test_fresh_unfinished_and_finished_runs(tmp_path):
    cfg = load_config([f"run_dir={tmp_path}", "trainer.steps=200"])
    assert check_existing_run(cfg) == 0  # nothing there: a fresh start
    checkpoint(tmp_path / "checkpoints", 150)
    assert check_existing_run(cfg) == 150
    checkpoint(tmp_path / "checkpoints", 200)
    # trained, but stopped before its final evaluation was written: the rerun makes it
    assert check_existing_run(cfg) == 200
    with pytest.raises(ConfigError, match="already finished at step 200"):
        check_existing_run(load_config([f"run_dir={tmp_path}", "trainer.steps=200",
                                        "trainer.resume=false"]))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"policy_version": 200, "final": True}) + "\n")
    with pytest.raises(ConfigError) as info:
        check_existing_run(cfg)
    assert str(info.value) == (f"run_dir {tmp_path} already finished at step 200 "
                               "(trainer.steps=200): "
                               "raise trainer.steps to continue, or use a new run_dir")
    assert check_existing_run(load_config([f"run_dir={tmp_path}", "trainer.steps=300"])) == 200
    with pytest.raises(ConfigError, match="trainer.resume=false"):
        check_existing_run(load_config([f"run_dir={tmp_path}", "trainer.steps=300",
                                        "trainer.resume=false"]))
    # a checkpoint_dir outside the run_dir is the one looked in
    cfg = load_config([f"run_dir={tmp_path / 'run'}", "trainer.steps=200", "eval.at_end=false",
                       f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}"])
    with pytest.raises(ConfigError, match="already finished at step 200"):
        check_existing_run(cfg)


def test_a_run_dir_is_locked_by_its_job_and_private_to_its_user_whatever_the_umask(tmp_path):
    held = lock_run_dir(tmp_path / "run")
    try:
        with pytest.raises(ConfigError,
                           match=rf"in use by a running job \(areal-like run pid {os.getpid()},"):
            lock_run_dir(tmp_path / "run")
    finally:
        os.close(held)
    old = os.umask(0o022)
    try:
        os.close(lock_run_dir(tmp_path / "new"))
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
        (tmp_path / "old").mkdir(mode=0o755)
        (tmp_path / "old" / "wal").mkdir()
        os.close(lock_run_dir(tmp_path / "old"))
        assert stat.S_IMODE(os.stat(tmp_path / "old").st_mode) == 0o700
    finally:
        os.umask(old)
    (tmp_path / "file").write_text("")  # a file where run_dir goes, or under it
    for run_dir, reason in ((tmp_path / "file", "File exists"),
                            (tmp_path / "file" / "sub", "Not a directory")):
        with pytest.raises(ConfigError, match=f"^run_dir {run_dir} cannot be used: {reason}"):
            lock_run_dir(run_dir)


def test_running_a_finished_run_again_exits_2_with_one_line(tmp_path):
    checkpoint(tmp_path / "run" / "checkpoints", 200)
    r = run_again(tmp_path / "run", "trainer.steps=200", "eval.at_end=false")
    assert r.stdout == ""  # no summary line claiming "ok": true
    assert r.stderr == (f"error: run_dir {tmp_path / 'run'} already finished at step 200 "
                        "(trainer.steps=200): "
                        "raise trainer.steps to continue, or use a new run_dir\n")
    assert not (tmp_path / "run" / "logs").exists()


def test_summary_counts_only_this_invocations_steps(tmp_path):
    jsonl = tmp_path / "metrics" / "trainer.jsonl"
    jsonl.parent.mkdir(parents=True)
    earlier = [{"step": s, "reward_mean": 0.1} for s in range(1, 11)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in earlier))
    since = jsonl.stat().st_size
    # this invocation resumed from the checkpoint at step 8: it re-trains 9 and 10, then 11 and 12
    now = ([{"event": "resume", "policy_version": 8}]
           + [{"step": s, "reward_mean": 0.5} for s in range(9, 13)])
    with jsonl.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in now))
    summary = summarize(tmp_path, 1.0, 0, since=since, resumed_from=8)
    assert summary["steps"] == 4 and summary["resumed_from"] == 8
    assert summary["reward_first"] == summary["reward_last"] == 0.5
    assert Path(summary["learning_curve"]).is_file()  # the curve shows the whole run
    fresh = summarize(tmp_path, 1.0, 0)
    assert fresh["steps"] == 12 and "resumed_from" not in fresh


class Supervisor:
    """on_trainer_done's supervisor; ``seen`` gets the Prometheus targets at each wait."""

    def __init__(self, targets: Path):
        live, exited = SimpleNamespace(poll=lambda: None), SimpleNamespace(poll=lambda: 0)
        self.procs = {"buffer": SimpleNamespace(popen=live, restart_at=None),
                      "rollout-0": SimpleNamespace(popen=live, restart_at=None),
                      "trainer": SimpleNamespace(popen=exited, restart_at=None)}  # completed
        self.stop_event = threading.Event()
        self.targets, self.seen = targets, []

    def proc(self, name):
        return self.procs[name]

    def pids(self):
        self.seen.append([t["labels"]["daemon"] for t in json.loads(self.targets.read_text())])
        return {"buffer": 1, "rollout-0": 2}


def trainer_done(tmp_path: Path, *overrides: str) -> Supervisor:
    """``on_trainer_done`` of a planned quickstart job whose final evaluation is written already."""
    cfg, topo = plan_job(load_config(["experiment=quickstart", f"run_dir={tmp_path}",
                                      *overrides]))
    (tmp_path / "eval.jsonl").write_text(json.dumps(
        {"policy_version": cfg.trainer.steps, "final": True}) + "\n")
    sup = Supervisor(tmp_path / "prometheus_targets.json")
    on_trainer_done(cfg, tmp_path, topo, sup)
    return sup


def test_trainer_done_waits_only_for_a_scheduled_eval_unscraped(tmp_path, capsys):
    assert trainer_done(tmp_path, "eval.at_end=false").seen == []
    assert "waiting for the final evaluation" not in capsys.readouterr().err
    assert trainer_done(tmp_path).seen == [["buffer", "rollout-0"]]  # written already: one look
    assert "[run] trainer done; waiting for the final evaluation" in capsys.readouterr().err


def test_trainer_done_starts_importing_the_plotting_code():
    script = textwrap.dedent("""
        import sys, tempfile, threading
        from pathlib import Path
        sys.path.insert(0, "tests/unit")
        from test_rundir import trainer_done
        assert "matplotlib.figure" not in sys.modules
        with tempfile.TemporaryDirectory() as d:
            trainer_done(Path(d), "eval.at_end=false")
        for t in threading.enumerate():
            if t.name == "warm-plotting":
                t.join()
        print(sorted(m for m in ("matplotlib.figure", "matplotlib.backends.backend_agg")
                     if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=REPO_ROOT, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == "['matplotlib.backends.backend_agg', 'matplotlib.figure']"


def test_the_summary_shows_a_first_evaluation_only_when_there_were_two(tmp_path):
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"policy_version": 200, "greedy_accuracy": 0.9, "final": True})
                     + "\n")
    assert list(eval_summary(tmp_path)) == ["eval_last"]  # not an "eval_first" repeating the last
    evals.write_text("".join(json.dumps({"policy_version": v, "greedy_accuracy": a}) + "\n"
                             for v, a in ((0, 0.1), (100, 0.5), (200, 0.9))))
    summary = eval_summary(tmp_path)
    assert summary["eval_first"] == {"policy_version": 0, "greedy_accuracy": 0.1}
    assert summary["eval_last"]["policy_version"] == 200


def test_the_learning_curve_legend_sits_outside_the_plot(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    recs = [{"step": s, "reward_mean": s / 100} for s in range(1, 101)]
    evals = [{"policy_version": v, "greedy_accuracy": v / 100, "mean@4": v / 120, "k": 4}
             for v in (0, 50, 100)]
    fig = curve_figure(tmp_path, recs, evals)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    [ax] = fig.axes
    legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not legend.overlaps(plot), (legend, plot)
    # below the axes, inside the image
    assert legend.y1 <= plot.y0 and fig.bbox.contains(legend.x0, legend.y0)


FREE = ["trainer.checkpoint_every=5", "trainer.checkpoint_async=true", "export.every=10",
        "export.at_end=false", "export.shard_mb=512", "buffer.metrics_port=29101",
        "rollout.metrics_port=29102", "trainer.metrics_port=29103"]


@pytest.mark.parametrize("again, changed", [
    (["trainer.steps=30", "trainer.lr=3e-4"], []),
    (["trainer.steps=30", "trainer.lr=1e-3"], ["trainer.lr: 0.0003 -> 0.001"]),
    # retention, cadence and metrics ports may change on resume
    (["trainer.steps=30", "trainer.keep_checkpoints=1", "export.keep=3"], []),
    (["trainer.steps=30", *FREE], []),
    ([*FREE, "trainer.lr=1e-3"], ["trainer.lr: 0.0003 -> 0.001"]),
])
def test_a_resume_lists_only_the_settings_that_change_the_training(tmp_path, monkeypatch, again,
                                                                    changed):
    run = tmp_path / "run"
    run.mkdir()
    write_settings(load_config([f"run_dir={run}", "trainer.steps=20", "trainer.lr=3e-4"]))
    monkeypatch.chdir(tmp_path)  # the same run_dir named another way: relative to it
    assert changed_settings(load_config(["run_dir=run", *again])) == changed


@pytest.mark.parametrize("change", ["trainer.lora.rank=4", "trainer.lora.rank=0",
                                    "trainer.lora.target_modules=[q_proj]"])
def test_the_adapters_layout_cannot_change_on_resume_even_when_accepted(tmp_path, change):
    write_settings(load_config([f"run_dir={tmp_path}", "trainer.lora.rank=8"]))
    checkpoint(tmp_path / "checkpoints", 5)
    with pytest.raises(ConfigError, match=r"LoRA adapters[\s\S]*" + change.split("=")[0]
                       .replace(".", r"\.")):
        check_resume_settings(load_config([f"run_dir={tmp_path}", "trainer.lora.rank=8",
                                           change]), accept=True)
    assert check_resume_settings(load_config([f"run_dir={tmp_path}", "trainer.lora.rank=8",
                                              "trainer.lora.alpha=32"]), accept=True) == [
        "trainer.lora.alpha: 16.0 -> 32.0"]
    # the same targets in another order (as PEFT lists them) are the same adapters
    same = "[down_proj,up_proj,gate_proj,o_proj,v_proj,k_proj,q_proj,q_proj]"
    assert check_resume_settings(load_config([f"run_dir={tmp_path}", "trainer.lora.rank=8",
                                              f"trainer.lora.target_modules={same}"]),
                                 accept=False) == []


def test_a_run_dir_run_before_its_first_checkpoint_keeps_its_settings(tmp_path):
    """Before the first checkpoint settings are compared too; the adapters' layout may change."""
    write_settings(load_config([f"run_dir={tmp_path}", "trainer.lr=3e-4"]))
    before = (tmp_path / SETTINGS_FILE).read_text()
    assert "would change 1:\nerror:   trainer.lr: 0.0003 -> 0.001\n" in run_again(
        tmp_path, "trainer.lr=1e-3").stderr
    assert (tmp_path / SETTINGS_FILE).read_text() == before
    assert check_resume_settings(load_config([f"run_dir={tmp_path}", "trainer.lr=3e-4",
                                              "trainer.lora.rank=4"]), accept=True) == [
        "trainer.lora.rank: 0 -> 4"]


def test_prometheus_scrapes_the_daemons_started_and_not_completed(tmp_path):
    """Targets: a daemon from its first start until it completes; a crashed one stays."""
    _, topo = plan_job(load_config(["experiment=quickstart", f"run_dir={tmp_path}"]))
    live = SimpleNamespace(poll=lambda: None, pid=4242)
    exited = SimpleNamespace(poll=lambda: 0, pid=4243)
    procs = {"buffer": SimpleNamespace(popen=live, restart_at=None),
             "rollout-0": SimpleNamespace(popen=exited, restart_at=12.5),  # to be restarted
             "trainer": SimpleNamespace(popen=None, restart_at=None)}  # not started yet
    sup = SimpleNamespace(pids=lambda: {}, proc=lambda name: procs[name])

    def listed() -> list[str]:
        write_ports(tmp_path, topo, sup)
        # status and top see the same daemons in job.json
        assert read_job(tmp_path)["daemons"] == json.loads(
            (tmp_path / "ports.json").read_text())["daemons"]
        return [t["labels"]["daemon"]
                for t in json.loads((tmp_path / "prometheus_targets.json").read_text())]

    names = {d["name"] for d in json.loads(json.dumps(topo.to_json()))["daemons"]}
    assert names == set(procs)
    assert listed() == ["buffer", "rollout-0"]
    procs["trainer"].popen = live
    assert listed() == ["buffer", "rollout-0", "trainer"]
    procs["trainer"].popen = exited  # completed: the job waits for its final evaluation
    assert listed() == ["buffer", "rollout-0"]


def test_a_start_refused_after_settings_were_written_leaves_them_as_they_were(tmp_path):
    same_port = ["buffer.metrics_port=29001", "trainer.metrics_port=29001"]
    write_settings(load_config([f"run_dir={tmp_path}", "trainer.steps=20", *same_port]))
    write_job(tmp_path, state="ended", started=10.0**9, summary={"end": "completed"})
    before = [(tmp_path / name).read_bytes() for name in (SETTINGS_FILE, JOB_FILE)]
    assert "the same fixed port" in run_again(tmp_path, "trainer.steps=30", *same_port).stderr
    assert [(tmp_path / name).read_bytes() for name in (SETTINGS_FILE, JOB_FILE)] == before
