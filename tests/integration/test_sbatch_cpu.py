"""`launch/slurm/areal_like.sbatch` runs a whole job, on one CPU node with stand-ins for Slurm.

No Slurm here: `srun` runs its command on this machine (its options dropped: no core binding),
`scontrol` names this host, `lscpu` reports 8 cores, and SGLang is `sglang_standin` (the embedded
engine's HTTP server in its place, started by the rollout server's real launcher). Everything else
is the script as a cluster runs it: `areal-like config` (preflight, laid out as `run` lays it out),
`python -m launch.srun steps`, one background step per process, the trainer's torchrun, the wait
for the final evaluation. The trainer runs on CPU beside an engine on "GPU" 0 of 2 (the engine's
device is cpu: CUDA_VISIBLE_DEVICES means nothing to it).

What the Slurm path used to get wrong shows here: the trainer's first push now
waits for the rollout server (`trainer.first_engine_wait_s` from the layout, not 0), so the
log-prob guard checks its engine instead of nobody, and the job ends only once the final evaluation
is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
JOB_S = 540.0  # ~80 s alone; the whole suite shares 2 cores
FAKE_SRUN = """#!/bin/bash
while (( $# )); do case "$1" in -w|-N|-n) shift 2 ;; -*) shift ;; *) break ;; esac; done
exec "$@"
"""
FAKE_LSCPU = ("#!/bin/bash\necho '# CPU,Core,Socket'; "
              "for c in 0 1 2 3 4 5 6 7; do echo \"$c,$c,0\"; done\n")


def _fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", "#!/bin/bash\necho localhost\n"),
                       ("lscpu", FAKE_LSCPU)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def _model(path: Path) -> None:
    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model

    build_model(load_config([]).model).save_pretrained(path)
    # a model directory carries its tokenizer (the preflight asks)
    char_tokenizer().save_pretrained(path)


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the script (its trap stops every step it started), then SIGKILL what is left, by
    PID."""
    family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.timeout(720)
def test_the_sbatch_script_runs_a_job_whose_guard_checks_its_engine_and_waits_for_the_final_eval(
        tmp_path, free_port):
    _fake_slurm(tmp_path / "bin")
    _model(tmp_path / "model")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{HERE / 'sglang_standin'}{os.pathsep}{REPO}",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_CPUS_ON_NODE": "8", "GPUS_PER_NODE": "2", "HEAD_IFACE": "lo",
           "RUN_DIR": str(run_dir),
           "BUFFER_PORT": str(free_port()), "PUB_PORT": str(free_port()),
           "TRAINER_PORT": str(free_port()),
           "METRICS_BASE": str(free_port()), "RESTARTS": "0",
           "VENV": sys.prefix,  # the script's `python` is this test's interpreter, activated or not
           "AREAL_LIKE_STANDIN_CONFIG": str(run_dir / "config.yaml"),
           "AREAL_LIKE_STANDIN_PIDS": str(tmp_path / "engine.pids")}
    env.pop("AREAL_LIKE_ENGINE_API_KEY", None)
    proc = subprocess.Popen(["bash", str(REPO / "launch/slurm/areal_like.sbatch"),
                             f"model.path={tmp_path / 'model'}", "trainer.device=cpu",
                             "rollout.engine.device=cpu", "model.dtype=float32",
                             "warm_start.steps=0", "trainer.steps=3"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=JOB_S)
    finally:
        _stop_tree(proc)
    assert proc.returncode == 0, out[-4000:]
    guard = [json.loads(line)
             for line in (run_dir / "metrics/trainer.jsonl").read_text().splitlines()
             if '"logprob_guard"' in line]
    # the first push waited for the engine
    assert [g["passed"] for g in guard] == [["rollout-0"]], guard
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert any(e.get("final") and e.get("policy_version") == 3 for e in evals), evals
    for pid in (int(p) for p in (tmp_path / "engine.pids").read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
