"""SGLang as the distillation teacher (``distill.teacher_engine=sglang``): its input log-probs
through the project's client are a direct forward's, and a group carries them, for a server
given by URL and for the job's teacher process (``engine_kit.check_teacher``,
``check_teacher_process``: the vLLM tier's too)."""

from __future__ import annotations

import asyncio

from sglang_kit import check_teacher, check_teacher_process

from areal_like.engines.sglang import SGLangClient


def test_sglang_teacher_logprobs_equal_a_direct_forward_and_reach_the_trajectory(sglang_server):
    s = sglang_server

    async def serve_the_model() -> None:  # the session's server: earlier tests pushed others
        async with SGLangClient(s.url, api_key=s.api_key, timeout_s=120) as client:
            await client.update_weights_from_disk(str(s.model_dir), weight_version="0")

    asyncio.run(serve_the_model())
    check_teacher(s.url, s.api_key, s.model_dir, "sglang")


def test_the_jobs_teacher_process_serves_a_directory_on_sglang(model_dir, tmp_path):
    check_teacher_process(model_dir, "sglang", tmp_path / "teacher.log")
