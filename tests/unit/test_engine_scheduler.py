"""Engine correctness at the scheduler level (no HTTP): greedy, logprobs, batching, abort."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from areal_like.settings.config import ModelConfig
from areal_like.weights.hf import build_model
from rollout_server.engine.sampling import SamplingParams
from rollout_server.engine.scheduler import Request, Scheduler

WAIT_S = 120.0  # generous: the machine is shared by many engineers
EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_model(ModelConfig(max_position_embeddings=192))


@pytest.fixture
def make_scheduler(model):
    made: list[Scheduler] = []

    def make(max_running: int = 3, max_total_tokens: int = 4096, own_model=None,
             **gather) -> Scheduler:
        s = Scheduler(own_model or model, max_running=max_running,
                      max_total_tokens=max_total_tokens, context_len=192,
                      weight_version="0", **gather).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 40, (n,), generator=g).tolist()
    return [[1] + torch.randint(4, 104, (k,), generator=g).tolist() for k in lens]


def run_all(s: Scheduler, ps: list[list[int]], params: list[SamplingParams], stop_eos: bool = True,
            then=lambda: None) -> list[Request]:
    """Submit every prompt, call ``then()``, wait for every answer."""
    done, finished = {}, threading.Event()

    def fin(r):
        done[r.rid] = r
        if len(done) == len(ps):
            finished.set()
    for i, (p, sp) in enumerate(zip(ps, params)):
        stop = frozenset(sp.stop_token_ids) | (frozenset([EOS]) if stop_eos else frozenset())
        s.submit(Request(rid=str(i), input_ids=p, params=sp, stop_ids=stop, on_finish=fin))
    then()
    assert finished.wait(WAIT_S), "requests did not finish"
    return [done[str(i)] for i in range(len(ps))]


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` of ``prompt``: the tokens an engine must answer."""
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=EOS,
                              pad_token_id=0)[0, len(prompt):].tolist()


def full_forward_logprobs(model, prompt: list[int], out: list[int],
                          temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(out)[:, None])[:, 0]


def test_many_rows_leaving_in_one_step_leave_the_others_their_own_kv(model, make_scheduler):
    """Rows finishing together: the moved rows (SlotKV.move) keep their own KV."""
    ps = prompts(12, seed=3)
    limits = [4, 20, 4, 4, 13, 4, 20, 4, 4, 13, 4, 4]
    s = make_scheduler(max_running=12)
    s.hold().result(WAIT_S)  # all twelve are admitted together, however slowly they arrive
    got = run_all(s, ps, [SamplingParams(max_new_tokens=m, temperature=0.0) for m in limits],
                  then=s.release)
    assert s.prefills == 1
    for p, m, r in zip(ps, limits, got):
        assert r.output_ids == greedy(model, p, m)


@pytest.mark.parametrize("temperature,top_p,top_k",
                         [(1.0, 1.0, 1 << 30), (0.7, 0.9, 20), (1.6, 1.0, 5)])
def test_logprobs_equal_separate_forward(model, make_scheduler, temperature, top_p, top_k):
    ps = prompts(6, seed=1)
    s = make_scheduler(max_running=4)
    params = [SamplingParams(max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k)
              for _ in ps]
    for p, r in zip(ps, run_all(s, ps, params, stop_eos=False)):
        ref = full_forward_logprobs(model, p, r.output_ids, temperature)
        assert (ref - torch.tensor(r.output_logprobs)).abs().max().item() <= 1e-4
        if top_k < 104:  # every sampled token is inside the truncated set
            with torch.no_grad():
                logits = model(torch.tensor([p + r.output_ids])).logits[0, len(p) - 1:-1]
            ranks = (logits > logits.gather(1, torch.tensor(r.output_ids)[:, None])).sum(-1)
            assert int(ranks.max()) < top_k


def test_seeded_sampling_is_reproducible(model, make_scheduler):
    s = make_scheduler()
    p = prompts(1, seed=2) * 3
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, sampling_seed=seed)
              for seed in (7, 7, 8)]
    a, b, c = run_all(s, p, params, stop_eos=False)
    assert a.output_ids == b.output_ids and a.output_ids != c.output_ids


def test_abort_returns_partial_and_frees_slot(model, make_scheduler):
    s = make_scheduler(max_running=2)
    finished, ev = {}, threading.Event()

    def fin(r):
        finished[r.rid] = r
        ev.set()
    long = Request(rid="long", input_ids=prompts(1)[0],
                   params=SamplingParams(max_new_tokens=180, temperature=0.0),
                   stop_ids=frozenset(), on_finish=fin)
    s.submit(long)
    while not long.output_ids:
        s.call(lambda sch: None).result(WAIT_S)
    s.abort("long", message="stop it")
    assert ev.wait(WAIT_S)
    r = finished["long"]
    assert r.finish_reason["type"] == "abort" and r.finish_reason["message"] == "stop it"
    assert 0 < len(r.output_ids) < 180 and len(r.output_logprobs) == len(r.output_ids)
    assert s.call(lambda sch: (len(sch.running), len(sch.waiting))).result(WAIT_S) == (0, 0)


def test_retract_and_weight_swap_between_steps(model, make_scheduler):
    """Pause with retract, load weights, release: outputs continue; versions switch."""
    other = build_model(ModelConfig(max_position_embeddings=192, init_seed=1))
    s = make_scheduler(max_running=2,
                       own_model=build_model(ModelConfig(max_position_embeddings=192)))
    p = prompts(1, seed=3)[0]
    done = threading.Event()
    req = Request(rid="r", input_ids=p, params=SamplingParams(max_new_tokens=60, temperature=0.0),
                  stop_ids=frozenset(), on_finish=lambda r: done.set())
    s.submit(req)
    while len(req.output_ids) < 5:
        s.call(lambda sch: None).result(WAIT_S)
    assert s.hold(retract=True).result(WAIT_S) == 1

    def swap(sch):
        sch.model.load_state_dict(other.state_dict())
        sch.weight_version = "1"
        return len(req.output_ids)
    cut = s.call(swap).result(WAIT_S)
    s.release().result(WAIT_S)
    assert done.wait(WAIT_S)
    assert req.output_versions == ["0"] * cut + ["1"] * (60 - cut)
    # tokens after the swap are exactly new-weights greedy continuations of prompt + old tokens
    with torch.no_grad():
        ref = other.generate(torch.tensor([p + req.output_ids[:cut]]), max_new_tokens=60 - cut,
                             do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p) + cut:].tolist()
    assert req.output_ids[cut:] == ref


@pytest.mark.parametrize("fail_at", [1, 4])  # the first prefill, a later decode step
def test_forward_failure_answers_every_request_and_stops(model, make_scheduler, fail_at):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.calls = model, model.config, 0

        def forward(self, **kw):
            self.calls += 1
            if self.calls == fail_at:
                raise RuntimeError("boom")
            return self.inner(**kw)

        # padded.prefill picks each row's last position at the head
        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()
    s = make_scheduler(max_running=2, own_model=Exploding())
    ps = prompts(3, seed=4)
    got = run_all(s, ps, [SamplingParams(max_new_tokens=50, temperature=0.0) for _ in ps],
                  stop_eos=False)
    assert all(r.finish_reason["type"] == "abort" and r.finish_reason["status_code"] == 500
               for r in got)
    assert "boom" in got[0].finish_reason["message"]
    assert not s.alive
    with pytest.raises(RuntimeError):
        s.submit(Request(rid="late", input_ids=[1, 5], params=SamplingParams(),
                         stop_ids=frozenset(), on_finish=lambda r: None))


def test_too_long_prompt_is_refused_not_fatal(model, make_scheduler):
    s = make_scheduler()
    bad, ok = run_all(s, [[1] * 192, [1, 5]],
                      [SamplingParams(max_new_tokens=3, temperature=0.0)] * 2, stop_eos=False)
    assert bad.finish_reason["type"] == "abort" and bad.finish_reason["status_code"] == 400
    assert ok.finish_reason == {"type": "length", "length": 3} and s.alive


def test_a_burst_at_an_idle_scheduler_is_prefilled_as_one_batch(model, make_scheduler):
    s = make_scheduler(max_running=8, gather_gap_s=2.0, gather_max_s=60.0)
    ps, finished, all_done = prompts(8, seed=3), [], threading.Event()

    def fin(r):
        finished.append(r)
        if len(finished) == len(ps):
            all_done.set()
    for i, p in enumerate(ps):
        if i:  # spaced like separate HTTP requests, within the scheduler's gather gap
            time.sleep(0.2)
        s.submit(Request(rid=str(i), input_ids=p,
                         params=SamplingParams(max_new_tokens=2, temperature=0.0),
                         stop_ids=frozenset(), on_finish=fin))
    assert all_done.wait(WAIT_S), "requests did not finish"
    assert s.prefills == 1 and s.prefill_tokens == sum(map(len, ps))


def test_only_submits_are_gathered(make_scheduler):
    """Non-submit commands reach an idle scheduler at once, ending a gather."""
    s = make_scheduler(gather_gap_s=30.0, gather_max_s=60.0)
    assert s.call(lambda sched: sched.prefills).result(timeout=15.0) == 0
    finished = threading.Event()
    s.submit(Request(rid="r", input_ids=[1, 5, 6],
                     params=SamplingParams(max_new_tokens=1, temperature=0.0),
                     stop_ids=frozenset(), on_finish=lambda r: finished.set()))
    assert s.call(lambda sched: len(sched.waiting)).result(timeout=15.0) == 1
    assert finished.wait(15.0) and s.prefills == 1


def _parked(s: Scheduler, when=lambda sch: True) -> threading.Event:
    """Park the scheduler inside a command where when holds; set the event to go on."""
    go, answers = threading.Event(), queue.Queue()

    def park(sch):
        answers.put(parked := when(sch))
        if parked:
            go.wait(WAIT_S)
    while True:
        s.call(park)
        if answers.get(timeout=WAIT_S):
            return go


def test_a_command_that_kills_the_loop_leaves_no_later_submit_unanswered(model, make_scheduler):
    s = make_scheduler(max_running=2)
    finished: dict[str, Request] = {}
    all_done = threading.Event()

    def fin(r):
        finished[r.rid] = r
        if len(finished) == 3:
            all_done.set()
    for rid in ("a", "b"):
        s.submit(Request(rid=rid, input_ids=[1, 5, 6], stop_ids=frozenset(), on_finish=fin,
                         params=SamplingParams(max_new_tokens=180, temperature=0.0)))
    go = _parked(s, when=lambda sch: len(sch.running) == 2)

    def broken_move(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    s.kv.move = broken_move
    s.abort("a")  # slot 0 leaves: slot 1's KV moves into it, and the copy fails
    s.submit(Request(rid="late", input_ids=[1, 7], params=SamplingParams(max_new_tokens=3),
                     stop_ids=frozenset(), on_finish=fin))
    go.set()
    assert all_done.wait(WAIT_S), f"unanswered: {sorted({'a', 'b', 'late'} - set(finished))}"
    assert finished["late"].finish_reason["status_code"] == 500 and not s.alive


def test_stop_answers_a_submit_still_in_the_inbox(make_scheduler):
    s = make_scheduler()
    go = _parked(s)
    done = threading.Event()
    req = Request(rid="r", input_ids=[1, 5], params=SamplingParams(max_new_tokens=3),
                  stop_ids=frozenset(), on_finish=lambda r: done.set())
    s.submit(req)
    later = s.call(lambda sch: "ran")
    s.stop(timeout_s=0)  # refuses new commands; the loop ends at its next turn
    go.set()
    assert done.wait(WAIT_S) and req.finish_reason["status_code"] == 503
    assert later.result(WAIT_S) == "ran"
