"""SGLang as the distillation teacher (``distill.teacher_engine=sglang``): its input log-probs
through the project's client are a direct forward's, and a group carries them, for a server
given by URL and for the job's teacher process (``engine_kit.check_teacher``,
``check_teacher_process``: the vLLM tier's too)."""

from __future__ import annotations

from sglang_kit import check_teacher, check_teacher_process


def test_sglang_teacher_logprobs_equal_a_direct_forward_and_reach_the_trajectory(sglang_server):
    s = sglang_server
    check_teacher(s.url, s.api_key, s.model_dir, "sglang")


def test_the_jobs_teacher_process_serves_a_directory_on_sglang(model_dir, tmp_path):
    check_teacher_process(model_dir, "sglang", tmp_path / "teacher.log")
