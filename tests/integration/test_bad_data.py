"""Groups no model can train on: refused by the buffer (a real BufferService on loopback) at
admission with the reason, their prompt skipped (it would come back the same); the trainer's
``BatchSource`` drops one that reaches it anyway and trains on the rest."""

from __future__ import annotations

import threading

import msgspec
import numpy as np
from test_buffer_service import make_cfg, make_group, register, running

from areal_like.job_facts import group_trajectories
from areal_like.net.transport import Server
from areal_like.settings.config import TaskConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from trainer.data import BatchSource

VOCAB = 104  # ModelConfig's default vocab_size (the char tokenizer)


def _with_tokens(group: P.TrajectoryGroup, prompt: list[int],
                 output: list[int]) -> P.TrajectoryGroup:
    t = group.trajectories[0]
    bad = Trajectory.of(prompt_ids=as_i32(prompt), output_ids=as_i32(output),
                       behav_logp=as_f32(np.full(len(output), -1.0)),
                       versions=as_i32(np.zeros(len(output))),
                       reward=t.reward, finish_reason="stop")
    return msgspec.structs.replace(group, trajectories=[bad, *group.trajectories[1:]])


def test_buffer_refuses_out_of_vocab_tokens_empty_prompts_and_oversized_groups_with_a_reason(
        tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=3)
    with running(cfg) as (svc, c):
        register(c)
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=5)).credits
        cases = [(_with_tokens(make_group(credits[0]), [7, 8], [1, VOCAB]),
                  "token_out_of_vocab: token id 104"),
                 (_with_tokens(make_group(credits[1]), [-3, 8], [1, 2]),
                  "token_out_of_vocab: token id -3"),
                 (_with_tokens(make_group(credits[2]), [], [1, 2]), "empty_prompt"),
                 # the edges are valid
                 (_with_tokens(make_group(credits[3]), [7, 8], [0, VOCAB - 1]), None)]
        for group, reason in cases:
            ack = c.request(group)
            if reason is None:
                assert ack.status == "accepted"
            else:
                assert ack.status == "rejected" and ack.reason.startswith(reason), ack.reason
        s = c.request(P.StatsRequest()).values
        assert (s["rejected_token_out_of_vocab"], s["rejected_empty_prompt"],
                s["groups_accepted"]) == (2, 1, 1)
        # the refused groups' slots came back and their prompts are skipped, not re-issued for ever
        assert (s["started"], s["in_flight"], s["stored"], s["reissue_queue"]) == (2, 1, 1, 0)

        # one member's group of 1,500 short trajectories (within the frame limit) made a step of
        # 1,556 rows: 27 s instead of 0.2 s; no rollout server makes more than task.group_size
        size = cfg.task.group_size
        ack = c.request(make_group(credits[4], rewards=[0.0, 1.0] * size))
        assert ack.status == "rejected" and ack.reason.startswith(
            f"too_many_trajectories: {2 * size}, more than the {size}"), ack.reason
        [credit] = c.request(P.CreditRequest(server_id="s0", max_credits=1)).credits
        full = make_group(credit, rewards=[float(i % 2) for i in range(size)])
        assert c.request(full).status == "accepted"  # the whole group is fine
        assert c.request(P.StatsRequest()).values["rejected_too_many_trajectories"] == 1

        # one member's group with a 200k-token trajectory (1.6 MB, within the 4 MiB frame limit)
        # stalled the trainer for good and took 12 GB in two minutes; no engine makes one
        context = cfg.model.max_position_embeddings
        credits = c.request(P.CreditRequest(server_id="s0", max_credits=2)).credits
        ack = c.request(_with_tokens(make_group(credits[0]), [7, 8], [1] * (context - 1)))
        assert ack.status == "rejected" and ack.reason.startswith(
            f"over_context: trajectory 0 has {context + 1} prompt and output tokens"), ack.reason
        assert c.request(_with_tokens(make_group(credits[1]), [7, 8],
                                      [1] * (context - 2))).status == "accepted"  # the whole
        assert c.request(P.StatsRequest()).values["rejected_over_context"] == 1
    agent = TaskConfig(group_size=4, max_turns=3, agent="tests.integration.agent_fns:hangs")
    assert group_trajectories(agent) == 12  # up to one trajectory per call of each episode


class OneBatch:
    """A buffer stand-in that answers every BatchRequest with the same groups."""

    def __init__(self, address: str, groups: list[P.TrajectoryGroup]):
        self.server, self.groups, self.stop = Server(address), groups, threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            if (got := self.server.recv(0.05)) is not None:
                peer, req_id, m = got
                self.server.send(peer, req_id, P.Batch(groups=self.groups,
                                                       trainer_version=m.trainer_version,
                                                       batch_id="b1"))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def test_trainer_drops_bad_groups_from_its_batch_and_goes_on(tmp_path, free_port):
    context = make_cfg(tmp_path).model.max_position_embeddings
    good, oov, empty, over = (make_group(P.Credit(lease_id=f"L{i}", prompt_index=i, epoch=0,
                                                  deadline_s=1.0)) for i in range(4))
    oov = _with_tokens(oov, [7], [VOCAB + 5])
    empty = _with_tokens(empty, [], [3])
    over = _with_tokens(over, [7, 8], [1] * (context - 1))
    address = f"tcp://127.0.0.1:{free_port()}"
    buffer = OneBatch(address, [oov, good, empty, over])
    source = BatchSource(address, 4, wait_s=0.05, buffer_timeout_s=30, rank=0, vocab_size=VOCAB,
                         context=context)
    try:
        batch = source.next_batch(0)
        assert batch is not None and int(batch.head_versions.numel()) == 1 and batch.n_seqs == 2
        assert int(batch.input_ids.max()) < VOCAB and source.dropped_groups == 3
        assert ([g.group_id for g in source.last_groups] == [good.group_id]
                and source.last_batch_id == "b1")
    finally:
        source.close()
        buffer.close()
