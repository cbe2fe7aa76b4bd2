"""The Slurm path gives every process the config, GPUs and start order ``areal-like run`` does.

For every GPU layout, the sbatch steps (areal-like config, then launch.srun steps) give each
daemon the config of the same process of run (plan_job + job_specs); on several nodes the plan is
the reference, plus each engine listening on its node's address (rollout.engine.host).
"""

from __future__ import annotations

import http.server
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import launch.preflight
from areal_like.settings.config import load_config, load_daemon_config, to_yaml
from launch import cli, srun
from launch.job import job_specs, plan_job

HEAD = ("buffer.address=tcp://10.1.2.3:5555", "buffer.pub_address=tcp://10.1.2.3:5556",
        "trainer.weight_sync.master_addr=10.1.2.3", "buffer.metrics_port=9100",
        "rollout.metrics_port=9101",
        "trainer.metrics_port=9200",  # what the sbatch script passes: HEAD_IP and fixed ports
        "warm_start.steps=0")  # `config` would train one: `run`'s plan below has none


def _one(gpus, trainer, servers, tp, *extra):
    return ("topology=gpu_sglang", f"launch.gpus_per_node={gpus}",
            f"launch.trainer_ranks={trainer}",
            f"launch.num_rollout_servers={servers}", f"rollout.engine.tp_size={tp}", *extra)


def _many(gpus, nodes, train_nodes, tp):
    return ("topology=gpu_sglang", f"launch.gpus_per_node={gpus}", f"launch.nodes={nodes}",
            f"launch.train_nodes={train_nodes}", f"launch.trainer_ranks={gpus}",
            f"launch.num_rollout_servers={gpus // tp}", f"rollout.engine.tp_size={tp}")


LAYOUTS = [
    _one(1, 1, 1, 1),  # one shared GPU: tensor path, SGLang's share, the trainer after the engine
    _one(1, 1, 1, 1, "rollout.engine.sglang.mem_fraction_static=0.3"),
    ("topology=gpu_embedded", "launch.gpus_per_node=1"),
    ("topology=gpu_embedded", "launch.gpus_per_node=2"),
    # a CPU trainer beside GPU engines
    ("topology=gpu_embedded", "trainer.device=cpu", "launch.gpus_per_node=2"),
    *(_one(*layout) for layout in [(2, 1, 1, 1), (4, 2, 2, 1), (4, 2, 1, 2), (8, 4, 2, 2),
                                   (8, 2, 3, 2), (8, 1, 1, 4)]),
    *(_many(g, n, t, tp) for g in (1, 2, 4, 8)
      for n, t, tp in [(2, 1, 1), (3, 1, 2), (3, 2, 1), (3, 2, 4)]
      if tp <= g),
    _many(4, 2, 1, 2),  # test_srun.py's
]


def _daemon_config(argv: list[str]):
    """The config a daemon started with argv reads: --config-file plus key=value after."""
    i = argv.index("--config-file")
    return load_daemon_config(argv[i:i + 2] + [a for a in argv[i + 2:]
                                               if "=" in a and not a.startswith("-")])


def _slurm(tmp_path: Path, overrides: tuple[str, ...], nodes: int, capsys) -> dict[str, tuple]:
    """Per step: (daemon config, CUDA_VISIBLE_DEVICES, the health URLs it waits for first)."""
    assert cli.main(["config", *overrides]) == 0
    config = tmp_path / "config.yaml"
    config.write_text(capsys.readouterr().out)
    hosts = ",".join(f"gpu{k}" for k in range(nodes))
    assert srun.main(["steps", "--config-file", str(config), "--hosts", hosts,
                      "--cpus-per-node", "64",
                      "--master-port", "29500", "--repo", "/repo"]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        name, _, cmd = line.split("\t")
        argv = shlex.split(cmd)
        rest = argv[argv.index("env") + 2:]
        waits = (rest[rest.index("--timeout-s") + 2:rest.index("--")]
                 if rest[:4] == ["python", "-m", "launch.srun", "after"] else [])
        out[name] = (_daemon_config(rest), argv[argv.index("env") + 1], waits)
    return out


def _run(tmp_path: Path, overrides: tuple[str, ...], nodes: int) -> dict[str, tuple]:
    """Per process of `run` (launch/job.py): (daemon config, CUDA_VISIBLE_DEVICES, start stage)."""
    cfg, topo = plan_job(load_config(list(overrides)))
    path = tmp_path / "run_config.yaml"
    path.write_text(to_yaml(cfg))
    out = {}
    for spec in job_specs(cfg, topo, path, python="py"):
        argv = list(spec.argv() if callable(spec.argv) else spec.argv)
        if nodes > 1 and spec.name.startswith("rollout-"):  # node k of the allocation is gpu<k>
            argv.append(f"rollout.engine.host=gpu{topo.slot(spec.name).node}")
        out[spec.name] = (_daemon_config(argv),
                          f"CUDA_VISIBLE_DEVICES={spec.env['CUDA_VISIBLE_DEVICES']}",
                          spec.stage)
    return out


@pytest.fixture
def no_preflight(monkeypatch):
    """The layout alone: the preflight (models resolved and checked, the other checks) is off."""
    monkeypatch.setattr(launch.preflight, "checked", lambda cfg: cfg)


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=lambda layout: " ".join(a.split(".")[-1] for a in layout[1:]))
def test_each_slurm_step_gets_the_config_run_gives_that_process(layout, tmp_path, monkeypatch,
                                                                capsys, no_preflight):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nodes = int(next((a.split("=")[1] for a in layout if a.startswith("launch.nodes=")), 1))
    overrides = (*layout, *HEAD, f"run_dir={tmp_path / 'run'}")
    slurm, run = _slurm(tmp_path, overrides, nodes, capsys), _run(tmp_path, overrides, nodes)
    assert sorted(slurm) == sorted(run)
    for name, (cfg, gpus, stage) in run.items():
        got, got_gpus, waits = slurm[name]
        assert got == cfg, name
        assert got_gpus == gpus, name
        rollouts = [f"http://10.1.2.3:{s[0].rollout.metrics_port}/health" for n, s in slurm.items()
                    if n.startswith("rollout-")]
        # buffer first: the sbatch script's own wait
        assert waits == (rollouts if stage == 2 else []), name


def test_steps_refuse_a_config_that_is_not_laid_out(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(load_config([*_one(1, 1, 1, 1), *HEAD, f"run_dir={tmp_path}"])))
    assert srun.main(["steps", "--config-file", str(config), "--hosts", "gpu0",
                      "--cpus-per-node", "8",
                      "--master-port", "29500", "--repo", "/repo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the config is not laid out for its launch.* layout (") and \
        "trainer.weight_sync" in err and "make it with `areal-like config`" in err


def test_after_starts_the_command_once_the_url_is_healthy_and_refuses_when_it_is_not():
    """launch.srun after (the shared-GPU trainer's wait) with a real server."""
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = Path(__file__).resolve().parents[2]
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ok = subprocess.run([sys.executable, "-m", "launch.srun", "after", "--timeout-s", "60",
                             f"{url}/health", "--", sys.executable, "-c", "print('started')"],
                            capture_output=True, text=True, timeout=120, cwd=root)
        assert (ok.returncode, ok.stdout) == (0, "started\n"), ok.stderr
        late = subprocess.run([sys.executable, "-m", "launch.srun", "after", "--timeout-s", "1",
                               f"{url}/nope", "--", sys.executable, "-c", "print('started')"],
                              capture_output=True, text=True, timeout=120, cwd=root)
        assert late.returncode == 1 and late.stdout == ""
        assert late.stderr.startswith(f"error: {url}/nope did not answer within 1 s; not starting")
    finally:
        server.shutdown()
        server.server_close()


def test_final_eval_waits_for_the_record_while_the_evaluating_step_lives(tmp_path):
    """The sbatch script's wait for the final evaluation, as `run` waits (launch/job.py)."""
    cfg = load_config([f"run_dir={tmp_path}", "experiment=quickstart", "trainer.steps=3",
                       "eval.at_end=true", "eval.final_timeout_s=60"])
    # the rollout-0 step
    step = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = threading.Timer(1.0, lambda: (tmp_path / "eval.jsonl").write_text(
            '{"final": true, "policy_version": 3}\n'))
        record.start()
        assert srun.final_eval(cfg, step.pid, poll_s=0.1) == 0  # returns once the record is there
        record.join()
        # an earlier run's
        (tmp_path / "eval.jsonl").write_text('{"final": true, "policy_version": 2}\n')
        step.kill()
        step.wait(timeout=30)
        assert srun.final_eval(cfg, step.pid, poll_s=0.1) == 1  # its server is gone: nothing comes
    finally:
        if step.poll() is None:
            step.kill()
            step.wait(timeout=30)
    assert srun.final_eval(load_config([f"run_dir={tmp_path}", "eval.at_end=false"]), 0) == 0
