"""The trainer's throughput on log-normal lengths, against a plain PyTorch + HF step, and its
memory at larger shapes (marker gpu; skipped without CUDA). ``train_figures.py`` runs the phases
in one child process, the compiled one last in a second (its docstring says what each does);
these tests record their figures:

* ``train_mfu_packed`` (%) and ``train_tokens_per_s_packed``: the trainer's packed bf16 step at
  Qwen2-0.5B's shape; beside them, from the same run on the same card, the plain step's as
  ``..._baseline_plain_hf``, and ``train_tokens_per_s_packed_ratio`` (tests/gpu/README.md's
  naming of baselines). Goals (the kit's goal table): MFU >= 35 %, ratio >= 1.3; one more
  packed step's torch.profiler table (``profiles/profile_train_packed_0.5B.txt``);
* ``train_tokens_per_s_1_5b``, ``train_mfu_1_5b`` (goal >= 40 %), ``train_peak_gib_1_5b`` against
  ``train_peak_estimate_gib_1_5b`` (``launch.memory.estimate_peak_bytes`` at the budget, an
  upper bound: the largest packed micro-batch is at most the budget);
* ``train_tokens_per_s_compiled`` and ``train_mfu_compiled``: the 0.5B step with
  ``trainer.compile_blocks=true`` (whether to turn it on by default on CUDA);
* ``lora7b_peak_gib`` against ``lora7b_peak_estimate_gib``: trainer/MEMORY.md's 7B rank-8 row
  with bf16 compute and checkpointing (the README's one-GPU LoRA claim rests on it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kit import ARTIFACTS_ENV  # noqa: E402
from test_throughput import peak_bf16_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIGURES = Path(__file__).resolve().parent / "train_figures.py"
BUDGET = 16384  # tokens per packed micro-batch (train_figures.py's default)
CHILD_TIMEOUT_S = 480


def run_figures(phases: list[str], log: Path, profile_dir: Path | None = None) -> dict[str, dict]:
    """``train_figures.py --phases ...`` in a child process: its reported phases by name (those
    finished by ``CHILD_TIMEOUT_S`` count; the child is killed then). With ``profile_dir``, one
    more packed 0.5B step is profiled into it."""
    from tests.conftest import child_env

    extra = ["--profile-dir", str(profile_dir)] if profile_dir else []
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(FIGURES), "--budget", str(BUDGET),
                                 "--phases", ",".join(phases), *extra], stdout=f,
                                env=child_env(), cwd=REPO)
        try:
            proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = {}
    for line in log.read_text().splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            out[res["phase"]] = res
    assert out, f"no phase reported (exit {proc.returncode}; its stderr is in the log above)"
    return out


@pytest.fixture(scope="module")
def phases(request, tmp_path_factory) -> dict[str, dict]:
    """The phases the selected tests of this module read (``train_figures.phases_for``: ``-k
    packed`` runs no 1.5B or 7B phase), the compiled one apart, in one child process (run on
    first use). The packed 0.5B step's profile goes where the kit keeps profiles."""
    from train_figures import phases_for

    here = Path(__file__).resolve()
    selected = [item.name for item in request.session.items
                if Path(str(item.fspath)).resolve() == here]
    folder = tmp_path_factory.mktemp("train_figures")
    profiles = Path(os.environ.get(ARTIFACTS_ENV) or folder)
    return run_figures(phases_for(selected), folder / "stdout", profile_dir=profiles)


def _phase(phases, name) -> dict:
    res = phases.get(name)
    assert res is not None, f"{name} did not report"
    assert "error" not in res, res["error"]
    return res


def _mfu(res: dict, gpu: str) -> float | None:
    peak = peak_bf16_flops(gpu)
    return None if peak is None else res["flops"] / res["seconds"] / peak


def test_packed_step_against_the_plain_hf_step(phases, figure):
    import torch

    packed, plain = _phase(phases, "packed_0.5B"), _phase(phases, "plain_0.5B")
    assert packed["tokens"] == plain["tokens"] and packed["loss"] == packed["loss"]
    tps, base = packed["tokens"] / packed["seconds"], plain["tokens"] / plain["seconds"]
    figure("train_tokens_per_s_packed", tps, "tokens/s")
    figure("train_tokens_per_s_packed_baseline_plain_hf", base, "tokens/s")
    figure("train_tokens_per_s_packed_ratio", tps / base, "x")
    figure("train_peak_gib_packed", packed["peak_bytes"] / 2**30, "GiB")
    figure("train_peak_gib_packed_baseline_plain_hf", plain["peak_bytes"] / 2**30, "GiB")
    gpu = torch.cuda.get_device_name(0)
    mfu, mfu_base = _mfu(packed, gpu), _mfu(plain, gpu)
    if mfu is not None:
        figure("train_mfu_packed", 100 * mfu, "%")
        figure("train_mfu_packed_baseline_plain_hf", 100 * mfu_base, "%")
        assert 0 < mfu < 1 and 0 < mfu_base < 1


def test_the_1_5b_step(phases, figure):
    import torch

    from launch.memory import GIB, estimate_peak_bytes, qwen2_shape

    res = _phase(phases, "packed_1.5B")
    figure("train_tokens_per_s_1_5b", res["tokens"] / res["seconds"], "tokens/s")
    mfu = _mfu(res, torch.cuda.get_device_name(0))
    if mfu is not None:
        figure("train_mfu_1_5b", 100 * mfu, "%")
    est = estimate_peak_bytes(qwen2_shape("1.5B"), 1, BUDGET, "bfloat16", False, 512,
                              accumulating=res["micro_batches"] > 1)
    figure("train_peak_gib_1_5b", res["peak_bytes"] / GIB, "GiB")
    figure("train_peak_estimate_gib_1_5b", est.total / GIB, "GiB")
    assert res["peak_bytes"] <= 1.15 * est.total, (res["peak_bytes"] / GIB, est.total / GIB)


def test_the_7b_lora_step_peak_memory_against_the_estimate(phases, figure):
    from train_figures import LORA_BUDGET, LORA_LEN, LORA_RANK, LORA_SEQS

    from launch.memory import GIB, estimate_lora_peak_bytes, qwen2_shape

    res = _phase(phases, "lora_7B")
    est = estimate_lora_peak_bytes(qwen2_shape("7B"), 1, LORA_BUDGET, LORA_RANK,
                                   dtype="bfloat16", checkpointing=True,
                                   accumulating=LORA_SEQS * LORA_LEN > LORA_BUDGET)
    figure("lora7b_peak_gib", res["peak_bytes"] / GIB, "GiB")
    figure("lora7b_peak_estimate_gib", est.total / GIB, "GiB")
    figure("lora7b_tokens_per_s", res["tokens"] / res["seconds"], "tokens/s")
    assert 0.85 <= res["peak_bytes"] / est.total <= 1.15, (res["peak_bytes"] / GIB,
                                                           est.total / GIB)


def test_the_compiled_step(phases, figure, tmp_path):
    """Last, in a child of its own: the slowest to start (inductor), and ``-k "not compiled"``
    leaves it out."""
    import torch

    eager = _phase(phases, "packed_0.5B")
    res = _phase(run_figures(["compiled_0.5B"], tmp_path / "stdout"), "compiled_0.5B")
    figure("train_tokens_per_s_compiled", res["tokens"] / res["seconds"], "tokens/s")
    figure("train_compiled_vs_eager", eager["seconds"] / res["seconds"], "x")
    mfu = _mfu(res, torch.cuda.get_device_name(0))
    if mfu is not None:
        figure("train_mfu_compiled", 100 * mfu, "%")
    assert res["loss"] == res["loss"]  # finite: a third step's, not comparable to eager's second
