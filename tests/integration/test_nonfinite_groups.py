"""Groups with non-finite (or implausible: -1e30, +5) behaviour log-probs are refused at admission.

Over real ZMQ to a BufferService: each refused with its reason, counted (stats and /metrics),
never stored, its prompt re-queued; BatchSource drops one that reaches it; -60 is accepted; a
prompt failing every time is tried MAX_ENGINE_RETRIES times an epoch.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
from test_bad_data import OneBatch
from test_buffer_service import make_cfg, make_group, register, running

from areal_like.net.metrics import scrape
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32
from trainer.data import BatchSource

BAD = (math.nan, math.inf, -math.inf)


def _with_logp(group: P.TrajectoryGroup, value: float, at: int = 1) -> P.TrajectoryGroup:
    """``group`` with ``value`` as the behaviour log-prob of token ``at`` of its last trajectory."""
    t = group.trajectories[-1]
    logp = np.array(t.behav_logp, dtype=np.float32)
    logp[at] = value
    bad = Trajectory.of(prompt_ids=t.prompt_ids, output_ids=t.output_ids, behav_logp=as_f32(logp),
                        versions=t.versions, reward=t.reward, finish_reason=t.finish_reason)
    return msgspec.structs.replace(group, trajectories=[*group.trajectories[:-1], bad])


def test_buffer_refuses_nonfinite_and_implausible_logprobs_counts_them_and_requeues_their_prompts(
        tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=3)
    with running(cfg) as (svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=6)).credits
        for credit, value in zip(credits, BAD):
            ack = c.request(_with_logp(make_group(credit), value))
            assert ack.status == "rejected", ack
            assert ack.reason.startswith("nonfinite_logp: trajectory 1"), ack.reason
            assert f"first {value}" in ack.reason and "at token 1" in ack.reason, ack.reason
        for credit, value in zip(credits[3:], (-1e30, 5.0)):
            ack = c.request(_with_logp(make_group(credit), value))
            assert ack.status == "rejected", ack
            assert ack.reason.startswith("implausible_logp: trajectory 1"), ack.reason
            assert "outside [-100.0, 0.1]" in ack.reason and "at token 1" in ack.reason, ack.reason
        # the most negative log-prob a real sampler gives in practice goes in
        assert c.request(_with_logp(make_group(credits[5]), -60.0)).status == "accepted"
        s = c.request(P.StatsRequest()).values
        assert (s["rejected_nonfinite_logp"], s["rejected_implausible_logp"]) == (3, 2)
        assert s["groups_accepted"] == 1 and s["stored"] == 1
        assert (s["in_flight"], s["reissue_queue"]) == (0, 5)  # slots came back, prompts queued
        page = scrape(f"http://127.0.0.1:{svc.metrics_server.port}/metrics")
        assert page['areal_buffer_rejected_total{reason="nonfinite_logp"}'] == 3
        assert page['areal_buffer_rejected_total{reason="implausible_logp"}'] == 2
        # the prompts go out again, first, and a finite group for each is accepted
        again = c.request(P.CreditRequest(server_id="s0", max_credits=5)).credits
        assert [x.prompt_index for x in again] == [x.prompt_index for x in credits[:5]]
        for credit in again:
            assert c.request(make_group(credit, rewards=(1.0, 0.0))).status == "accepted"
        batch = c.request(P.BatchRequest(n_groups=6, trainer_version=0, wait_s=5.0))
        assert len(batch.groups) == 6
        assert all(np.isfinite(t.behav_logp).all() for g in batch.groups for t in g.trajectories)


def test_a_prompt_refused_for_its_numbers_every_time_is_skipped_after_three_tries(tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=3)
    with running(cfg) as (svc, c):
        register(c)
        first = c.request(P.CreditRequest(server_id="s0", max_credits=1)).credits[0]
        credit, tries = first, []
        for _ in range(3):
            tries.append(credit.prompt_index)
            assert c.request(_with_logp(make_group(credit), math.nan)).status == "rejected"
            credit = c.request(P.CreditRequest(server_id="s0", max_credits=1)).credits[0]
        assert tries == [first.prompt_index] * 3  # re-issued twice, first
        assert credit.prompt_index != first.prompt_index  # then skipped: the cursor moves on
        s = c.request(P.StatsRequest()).values
        assert s["rejected_nonfinite_logp"] == 3 and s["reissue_queue"] == 0


def test_trainer_drops_a_nonfinite_group_that_reaches_it(free_port):
    credits = [P.Credit(lease_id=f"L{i}", prompt_index=i, epoch=0, deadline_s=1.0)
               for i in range(3)]
    groups = [_with_logp(make_group(c), v) for c, v in zip(credits, BAD)]
    good = make_group(P.Credit(lease_id="L9", prompt_index=9, epoch=0, deadline_s=1.0))
    address = f"tcp://127.0.0.1:{free_port()}"
    buffer = OneBatch(address, [*groups, good])
    source = BatchSource(address, 4, wait_s=0.05, buffer_timeout_s=30, rank=0, vocab_size=104)
    try:
        batch = source.next_batch(0)
        assert batch is not None and source.dropped_groups == 3
        assert [g.group_id for g in source.last_groups] == [good.group_id]
        assert bool(np.isfinite(batch.behav_logp.numpy()).all())
    finally:
        source.close()
        buffer.close()
