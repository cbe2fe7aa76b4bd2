"""SGLang on CPU with tp_size>1: its launch environment, and more ranks than CPUs refused."""

from __future__ import annotations

import os

import pytest

from areal_like.daemon import StartRefused
from areal_like.settings.config import load_config
from launch import preflight as pf
from rollout_server.launch_sglang import THREADS_BIND, sglang_env, threads_bind
from tests.conftest import run_cli


def cpu_engine(tp: int):
    return load_config(["topology=cpu_sglang", f"rollout.engine.tp_size={tp}"]).rollout.engine


def test_sglang_on_cpu_finds_no_nccl_library_and_each_rank_gets_cpus_of_its_own(monkeypatch):
    """With the CUDA build of torch, SGLang's NCCL communicator found NCCL and bound the ranks'
    ``cpu`` device as a CUDA device: tp 2 never started."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1, 0, 2, 4})
    env = sglang_env(cpu_engine(1), {})
    assert env["SGLANG_NCCL_SO_PATH"] and not os.path.exists(env["SGLANG_NCCL_SO_PATH"])
    assert THREADS_BIND not in env  # one rank: SGLang's own default
    assert sglang_env(cpu_engine(2), {})[THREADS_BIND] == "0,1|2,3,4"
    assert sglang_env(cpu_engine(2), {THREADS_BIND: "0-3|4-7"})[THREADS_BIND] == "0-3|4-7"  # user's


@pytest.mark.parametrize("tp,cpus,bind", [(2, [0, 1], "0|1"), (2, [8, 9, 10, 11], "8,9|10,11"),
                                          (3, [0, 1, 2, 3, 4, 5, 6], "0,1|2,3|4,5,6")])
def test_threads_bind_splits_the_cpus_in_contiguous_groups(tp, cpus, bind):
    assert threads_bind(tp, cpus) == bind


def test_more_ranks_than_cpus_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(StartRefused, match=r"^rollout\.engine\.tp_size=3: SGLang on CPU"):
        sglang_env(cpu_engine(3), {})
    [why] = pf.check_cpu_ranks(load_config(["topology=cpu_sglang", "rollout.engine.tp_size=3"]))
    assert why.startswith("rollout.engine.tp_size=3: SGLang on CPU (rollout.engine.sglang.device="
                          "cpu) runs a rank on CPUs of its own and this process may use 2")
    assert pf.check_cpu_ranks(load_config(["topology=cpu_sglang", "rollout.engine.tp_size=2"])) \
        == []
    monkeypatch.setenv(THREADS_BIND, "0|1|1")  # the user's binding: SGLang checks it
    assert pf.check_cpu_ranks(load_config(["topology=cpu_sglang", "rollout.engine.tp_size=3"])) \
        == []


def test_areal_like_run_refuses_more_cpu_ranks_than_cpus_before_starting_anything(tmp_path):
    tp = len(os.sched_getaffinity(0)) + 1
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != THREADS_BIND}
    r = run_cli("run", "-q", f"run_dir={run_dir}", "topology=cpu_sglang",
                f"rollout.engine.tp_size={tp}", timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    assert any(line.startswith(f"error: rollout.engine.tp_size={tp}: SGLang on CPU ")
               for line in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()
