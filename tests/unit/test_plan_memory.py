"""`areal-like plan` ends a GPU job's layout with its estimated memory per GPU against
``launch.gpu_memory_gb``, from known Qwen2.5 shapes or a local ``config.json`` (no download)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from launch.memory import QWEN2_SHAPES
from tests.conftest import run_cli

VERDICT = re.compile(r"^  (.+): ([\d.]+ \+ )*[\d.]+ = ([\d.]+) of ([\d.]+) GiB.*: "
                     r"(fits|does NOT fit)")


def plan(*overrides: str) -> subprocess.CompletedProcess:
    return run_cli("plan", *overrides, timeout=120)


def memory_block(stdout: str) -> list[str]:
    """The lines after the layout's blank line."""
    table, _, memory = stdout.partition("\n\n")
    return memory.splitlines()


def verdicts(lines: list[str]) -> dict[str, tuple[float, float, bool]]:
    """Per kind of GPU: (estimated GiB, the GPU's GiB, fits)."""
    out = {}
    for line in lines:
        if m := VERDICT.match(line):
            out[m[1]] = (float(m[3]), float(m[4]), m[5] == "fits")
    return out


@pytest.mark.parametrize("experiment,topology,gpus", [
    ("gsm8k_qwen25_05b_24gb", "gpu_sglang", ["GPU 0 (trainer and engine)"]),
    ("gsm8k_qwen25_05b_24gb", "gpu_vllm", ["GPU 0 (trainer and engine)"]),
    ("math_qwen25_15b_lora_24gb", "gpu_sglang", ["GPU 0 (trainer and engine)"]),
    ("math_qwen25_15b_lora_24gb", "gpu_vllm", ["GPU 0 (trainer and engine)"]),
    ("math_qwen25_7b_lora_24gb", "gpu_sglang", ["each trainer GPU", "each engine GPU"]),
])
def test_the_24gb_presets_fit_a_24gb_gpu_by_the_estimate(experiment, topology, gpus):
    r = plan(f"experiment={experiment}", f"topology={topology}")
    assert r.returncode == 0, r.stderr
    lines = memory_block(r.stdout)
    assert lines[0].startswith("memory per GPU, estimated for launch.gpu_memory_gb=24 ")
    got = verdicts(lines)
    assert sorted(got) == sorted(gpus), lines
    for used, size, fits in got.values():
        assert size == 24 and fits and used < 23, lines  # a GiB of headroom at least
    assert any(line.startswith("  trainer ") for line in lines)
    engine = next(line for line in lines if line.startswith("  engine "))
    assert "KV cache" in engine and "no room" not in engine


def test_the_80gb_recipe_does_not_fit_24gb_and_the_estimate_follows_the_config():
    """The 80 GB recipe on a 24 GB card is said not to fit (the plan still exits 0: an estimate)."""
    big = plan("experiment=gsm8k_qwen25_05b", "launch.gpus_per_node=1", "launch.gpu_memory_gb=24",
               "trainer.activation_checkpointing=false")
    assert big.returncode == 0, big.stderr
    (used, size, fits), = verdicts(memory_block(big.stdout)).values()
    assert size == 24 and not fits and used > 24


def test_a_local_model_directory_is_sized_from_its_config_json(tmp_path):
    """A ``model.path``'s config.json gives the shape; a mixture of experts gets no estimate."""
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "max_position_embeddings": 32768, **QWEN2_SHAPES["0.5B"]}))
    hub = plan("experiment=gsm8k_qwen25_05b_24gb")
    local = plan("experiment=gsm8k_qwen25_05b_24gb", f"model.path={tmp_path / 'dense'}")
    assert hub.returncode == local.returncode == 0, local.stderr
    assert memory_block(local.stdout) == memory_block(hub.stdout)
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps(
        {**QWEN2_SHAPES["0.5B"], "num_experts": 8}))
    moe = plan("experiment=gsm8k_qwen25_05b_24gb", f"model.path={tmp_path / 'moe'}")
    assert moe.returncode == 0, moe.stderr
    assert memory_block(moe.stdout)[1] == (f"  no estimate: model.path={tmp_path / 'moe'} is a "
                                           "mixture of experts other than Qwen3-MoE's with every "
                                           "block a mixture; the estimate models that one and "
                                           "dense blocks")


def test_a_cpu_job_prints_no_memory_block():
    r = plan("experiment=quickstart", "launch.trainer_ranks=1", "launch.num_rollout_servers=1")
    assert r.returncode == 0, r.stderr
    assert "\n\n" not in r.stdout and "memory per GPU" not in r.stdout
