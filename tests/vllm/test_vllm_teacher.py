"""vLLM as the distillation teacher (``distill.teacher_engine=vllm``): its prompt log-probs
through the project's client are a direct forward's, and a group carries them, for a server
given by URL and for the job's teacher process (``engine_kit.check_teacher``,
``check_teacher_process``: the SGLang tier's too)."""

from __future__ import annotations

from vllm_kit import check_teacher, check_teacher_process


def test_vllm_teacher_logprobs_equal_a_direct_forward_and_reach_the_trajectory(vllm_server):
    s = vllm_server
    check_teacher(s.url, s.api_key, s.model_dir, "vllm")


def test_the_jobs_teacher_process_serves_a_directory_on_vllm(model_dir, tmp_path):
    check_teacher_process(model_dir, "vllm", tmp_path / "teacher.log")
