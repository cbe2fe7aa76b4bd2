"""``launch/kuberay/rayjob.yaml`` offline: a ray run ``areal-like plan`` accepts, worker pods that
hold its bundles and see the shared storage (applying it to a cluster: launch/RAY.md)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from areal_like.settings.config import load_config
from launch.cli import main
from launch.ray_job import layout_bundles

EXAMPLE = Path(__file__).resolve().parents[2] / "launch" / "kuberay" / "rayjob.yaml"


def _job() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _overrides() -> list[str]:
    argv = shlex.split(_job()["spec"]["entrypoint"])
    assert argv[:2] == ["areal-like", "run"] and "launch.cluster=ray" in argv, argv
    return argv[2:]


def test_the_entrypoint_is_a_ray_run_whose_layout_plan_accepts(capsys):
    assert main(["plan", *_overrides()]) == 0
    lines = capsys.readouterr().out.splitlines()
    cfg = load_config(_overrides())
    la = cfg.launch
    servers = [ln for ln in lines if " rollout-" in ln]
    assert len(servers) == la.num_rollout_servers * (la.nodes - la.train_nodes), lines
    assert any(" trainer " in ln and "8 ranks" in ln for ln in lines), lines


def test_the_worker_pods_hold_every_bundle_and_see_the_shared_storage():
    spec = _job()["spec"]["rayClusterSpec"]
    cfg = load_config(_overrides())
    bundles, shared = layout_bundles(cfg)
    assert not shared and len(bundles) == cfg.launch.nodes
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no bundle lands on the head
    pods = []
    for group in spec["workerGroupSpecs"]:
        params, limits = group["rayStartParams"], \
            group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(params["num-gpus"]) == int(limits["nvidia.com/gpu"])
        assert int(params["num-cpus"]) <= int(limits["cpu"])
        pods += [{"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])}] * \
            group["minReplicas"]
    # SPREAD puts one bundle per pod: each bundle fits a pod of its own
    free = sorted(pods, key=lambda p: (p["GPU"], p["CPU"]))
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b["CPU"])):
        fit = next(p for p in free if all(p[k] >= v for k, v in bundle.items()))
        free.remove(fit)
    mounts = [{m["mountPath"]: m["name"] for m in pod["template"]["spec"]["containers"][0][
        "volumeMounts"]} for pod in (head, *spec["workerGroupSpecs"])]
    assert all(m.get("/shared") == "shared" for m in mounts), mounts
    for key in ("run_dir", "model.path", "task.dataset_path"):
        value = next(a.split("=", 1)[1] for a in _overrides() if a.startswith(key + "="))
        assert value.startswith("/shared/"), (key, value)
