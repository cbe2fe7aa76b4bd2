"""Teacher log-probs (rollout_server/teacher.py): exact, keyed, failures counted, in plan."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from areal_like.net.metrics import Metrics
from areal_like.settings.config import ConfigError, EngineConfig, load_config
from areal_like.settings.distill_schema import DistillConfig
from areal_like.tasks.datasets import Example
from launch.preflight import PreflightError, checked
from launch.topology import teacher_overrides
from rollout_server.engine import EmbeddedEngine
from rollout_server.teacher import Teacher, TeacherError, teacher_for, teachers
from tests.conftest import run_cli
from tests.engine_kit import model_config, save_model

PROMPT = [5, 6, 7]
OUTPUTS = [[10, 11, 12, 13], [20, 21], [30]]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_model(tmp_path_factory.mktemp("teacher"), init_seed=3)


def direct(teacher_dir) -> list[list[float]]:
    """log_softmax(logits)[token] of each output token, from one plain transformers forward."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    out = []
    for o in OUTPUTS:
        ids = torch.tensor([PROMPT + o])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append([float(logp[len(PROMPT) - 1 + t, tok]) for t, tok in enumerate(o)])
    return out


def ask(teacher: Teacher, masks=None) -> list:
    async def go():
        try:
            return await teacher.group_logprobs(PROMPT, OUTPUTS,
                                                masks or [[1] * len(o) for o in OUTPUTS])
        finally:
            await teacher.client.close()
    return asyncio.run(go())


def assert_direct(got, want) -> None:
    assert [len(a) for a in got] == [len(b) for b in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


def test_a_keyed_teacher_engine_over_http_equals_a_direct_forward_as_sglang_answers(teacher_dir):
    """Keyed as the job's teacher process is (a teacher given by URL, no key: the routing test).
    input_token_logprobs from logprob_start_len s: one per token from s, None for s; only for a
    request that generates nothing."""
    key = "k" * 32
    engine = EmbeddedEngine(model_config(teacher_dir), EngineConfig(), api_key=key).start()
    ids = PROMPT + OUTPUTS[0]

    def post(max_new_tokens: int):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens},
                "return_logprob": True, "logprob_start_len": 2}
        req = urllib.request.Request(engine.url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["meta_info"]["input_token_logprobs"]
    try:
        teacher = Teacher(DistillConfig(teachers=[engine.url]), engine.url, api_key=key)
        got = ask(teacher)
        # a context token (mask 0) gets 0, as its behaviour log-prob
        masked = ask(teacher, [[1, 0, 1, 1], [1, 1], [0]])
        # no token sampled: nothing asked, nothing failed
        assert asyncio.run(teacher.group_logprobs(PROMPT, [[], []], [[], []])) == [[], []]
        entries = post(0)
        with pytest.raises(urllib.error.HTTPError) as info:
            post(2)
        assert info.value.code == 400 and "max_new_tokens=0" in info.value.read().decode()
    finally:
        engine.stop()
    want = direct(teacher_dir)
    assert_direct(got, want)
    assert masked[0][1] == 0.0 and masked[2] == [0.0] and masked[0][2] == got[0][2]
    assert [e[1] for e in entries] == ids[2:] and entries[0][0] is None
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[-len(want[0]):]]),
                               torch.tensor(want[0]), rtol=0, atol=1e-5)


def test_a_failing_teacher_is_counted_and_its_policy_applied(teacher_dir, free_port):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    metrics = Metrics()
    keep = Teacher(DistillConfig(teachers=[url], on_teacher_failure="task_reward_only",
                                 teacher_timeout_s=5.0), url, metrics)
    assert ask(keep) == [None, None, None]
    drop = Teacher(DistillConfig(teachers=[url], teacher_timeout_s=5.0), url, metrics)
    with pytest.raises(TeacherError, match=f"teacher {url}: "):
        ask(drop)
    assert (f'rollout_teacher_failures_total{{kind="error",teacher="{url}"}} 2.0'
            in metrics.render().decode())


def test_a_teacher_that_answers_a_log_prob_that_is_not_finite_has_failed():
    class NotFinite(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rows = [{"meta_info": {"input_token_logprobs": [[float("nan"), t, None] for t in ids]}}
                    for ids in body["input_ids"]]
            answer = json.dumps(rows).encode()  # NaN, as Python's json writes it
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFinite)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        metrics = Metrics()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        keep = Teacher(DistillConfig(teachers=[url], on_teacher_failure="task_reward_only"),
                       url, metrics)
        assert ask(keep) == [None] * len(OUTPUTS)
        assert (f'rollout_teacher_failures_total{{kind="error",teacher="{url}"}} 1.0'
                in metrics.render().decode())
        # answering is not recovering: down_s runs from the first of its failures, so the
        # server's grace for a teacher being restarted ends (rollout_server/server.py)
        drop = Teacher(DistillConfig(teachers=[url]), url, metrics)
        masks = [[1] * len(o) for o in OUTPUTS]

        async def twice() -> float:
            try:
                for gap in (0.3, 0.0):
                    with pytest.raises(TeacherError) as info:
                        await drop.group_logprobs(PROMPT, OUTPUTS, masks)
                    await asyncio.sleep(gap)  # a known time between the two failures
                return info.value.down_s
            finally:
                await drop.client.close()
        assert asyncio.run(twice()) >= 0.3
    finally:
        server.shutdown()
        server.server_close()


T1 = "task.temperature=1.0"  # the teacher's log-probs are at temperature 1: so must sampling be


@pytest.mark.parametrize("overrides,why", [
    (["distill.teachers=[http://127.0.0.1:1]"], "task.temperature=2.0 is invalid: must be 1.0 "
     "with distill.teachers"),
    (["distill.teachers=[ftp://host/t]", T1], "distill.teachers=['ftp://host/t'] is invalid"),
    (["distill.teachers=[http://127.0.0.1:1]", T1, "task.top_p=0.9"], "task.top_p=0.9 is invalid"),
    (["distill.teachers=[http://127.0.0.1:1]", T1, "task.top_k=5"], "task.top_k=5 is invalid")])
def test_a_teacher_the_student_cannot_be_compared_with_is_refused_at_load(overrides, why):
    with pytest.raises(ConfigError, match=re.escape(why)):
        load_config(overrides)


def test_preflight_refuses_another_tokenizer_and_plan_shows_the_teacher(teacher_dir):
    checked(load_config([f"distill.teachers=[{teacher_dir}]", T1]))
    with pytest.raises(PreflightError, match=f"the teacher '{teacher_dir}' has another tokenizer "
                       "than the student's model.tokenizer='bpe'"):
        checked(load_config([f"distill.teachers=[{teacher_dir}]", "model.tokenizer=bpe",
                             "model.vocab_size=512", T1]))
    # a directory that is not there is not read as the char tokenizer's, which the student has
    with pytest.raises(PreflightError, match="distill.teachers='/nonexistent/t' does not exist"):
        checked(load_config(["distill.teachers=[/nonexistent/t]", T1]))
    r = run_cli("plan", f"distill.teachers=[{teacher_dir}]", T1, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    own = [row for row in rows if row.split()[1:2] == ["teacher-0"]]
    assert len(own) == 1 and f"engine embedded on cpu http://127.0.0.1:auto  model {teacher_dir}" \
        in own[0], r.stdout
    servers = [row for row in rows if "rollout-" in row]
    assert servers and all("teacher process teacher-0" in row for row in servers)
    url = "http://127.0.0.1:9"
    r = run_cli("plan", f"distill.teachers=[{url}]", T1, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not [row for row in r.stdout.splitlines() if row.split()[1:2] == ["teacher-0"]]
    assert all(f"teacher {url}" in row for row in r.stdout.splitlines() if "rollout-" in row)


def test_several_teachers_route_by_the_rows_task(teacher_dir, tmp_path):
    other = save_model(tmp_path / "other", init_seed=4)
    engines = [EmbeddedEngine(model_config(d), EngineConfig()).start()
               for d in (teacher_dir, other)]
    try:
        cfg = DistillConfig(teachers=[e.url for e in engines],
                            teacher_tasks=[["math", "sum"], []])
        both = teachers(cfg)
        picked = {task: teacher_for(both, Example("p", "a", metadata={"task": task}))
                  for task in ("math", "sum", "code")}
        assert teacher_for(both, Example("p", "a")) is both[1]  # no task column: the others'
        assert [picked[t] for t in ("math", "sum", "code")] == [both[0], both[0], both[1]]
        got = [ask(t) for t in both]
    finally:
        for e in engines:
            e.stop()
    for g, want in zip(got, (direct(teacher_dir), direct(other))):
        assert_direct(g, want)
    assert got[0] != got[1]


@pytest.mark.parametrize("tasks,why", [
    ([["a"]], "one list of tasks per teacher (2 teachers)"),
    ([["a"], ["a"]], "a task taught by one teacher only"),
    ([[], []], "at most one empty list")])
def test_teacher_tasks_that_route_a_task_twice_or_not_per_teacher_are_refused(tasks, why):
    with pytest.raises(ConfigError, match=re.escape(why)):
        DistillConfig(teachers=["http://127.0.0.1:1", "http://127.0.0.1:2"], teacher_tasks=tasks)


def test_a_task_no_teacher_scores_is_refused_before_start_and_plan_shows_each(teacher_dir,
                                                                             tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "task": task}
            for i, task in enumerate(["math", "code", "math", "chat"])]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    routed = ["task=dataset", f"task.dataset_path={data}", "task.max_new_tokens=8",
              "task.reward_fn=areal_like.tasks.task:exact_match", T1,
              f"distill.teachers=[{teacher_dir},http://127.0.0.1:9]"]
    with pytest.raises(PreflightError, match=re.escape("no teacher scores the rows of task(s) "
                                                       "['chat']")):
        checked(load_config([*routed, "distill.teacher_tasks=[[math],[code]]"]))
    checked(load_config([*routed, "distill.teacher_tasks=[[math],[]]"]))
    r = run_cli("plan", *routed, "distill.teacher_tasks=[[math],[]]", timeout=120)
    assert r.returncode == 0, r.stderr
    servers = [row for row in r.stdout.splitlines() if "rollout-" in row]
    assert servers and all("teacher process teacher-0 (tasks math)  teacher http://127.0.0.1:9 "
                           "(tasks the others)" in row for row in servers), r.stdout


def test_a_teacher_directory_is_served_on_distill_teacher_engine(teacher_dir):
    job = [f"distill.teachers=[{teacher_dir}]", T1, "distill.teacher_engine=vllm",
           "rollout.pause_mode=retract"]
    own = load_config([*job, *teacher_overrides(str(teacher_dir), load_config(job).distill)])
    assert (own.rollout.engine.kind, own.model.path) == ("vllm", str(teacher_dir))
    assert own.trainer.lora.rank == 0 and own.rollout.engine.tp_size == 1
    r = run_cli("plan", *job, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"engine vllm http://127.0.0.1:auto  model {teacher_dir}" in r.stdout, r.stdout
