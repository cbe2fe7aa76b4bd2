"""trainer/data.py and the output-token alignment of trainer/step.py, single process."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from tests.helpers_trainer import BufferStandIn
from trainer.data import BatchSource, BufferUnavailable, groups_to_batch
from trainer.model import attach_logprobs
from trainer.step import output_logp


def _group(gid: int, prompts_outputs: list[tuple[list[int], list[int]]],
           versions: int = 0) -> P.TrajectoryGroup:
    trajs = [Trajectory.of(prompt_ids=as_i32(p), output_ids=as_i32(o),
                           behav_logp=as_f32([-0.5] * len(o)),
                           versions=as_i32([versions] * len(o)), reward=float(len(o)),
                           finish_reason="stop")
             for p, o in prompts_outputs]
    return P.TrajectoryGroup(group_id=f"g{gid}", server_id="s", lease_id=str(gid),
                             prompt_index=gid, epoch=0,
                             trajectories=trajs)


def test_groups_to_batch_layout():
    b = groups_to_batch([_group(0, [([1, 5], [7, 8, 9]), ([1], [6])]),
                         _group(1, [([1, 4, 4], [2])], versions=3)])
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 9], [1, 6, 0, 0, 0], [1, 4, 4, 2, 0]]
    assert b.prompt_lens.tolist() == [2, 1, 3] and b.output_lens.tolist() == [3, 1, 1]
    assert b.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert b.behav_logp[0].tolist() == [-0.5] * 3 and b.behav_logp[1].tolist() == [-0.5, 0, 0]
    assert b.group_ids.tolist() == [0, 0, 1] and b.head_versions.tolist() == [0, 3]
    assert b.rewards.tolist() == [3.0, 1.0, 1.0] and b.n_tokens == 5
    sub = b.select([1, 2])  # trimmed to the longest selected sequence
    assert sub.input_ids.tolist() == [[1, 6, 0, 0], [1, 4, 4, 2]] and sub.mask.shape == (2, 1)


def test_output_logp_reads_the_logits_that_predict_each_output_token():
    vocab = 11
    table = torch.randn(vocab, vocab)  # logits at a position = table[token at that position]

    class TableModel(torch.nn.Module):  # hidden state = one-hot of the token; lm_head = table^T
        config = SimpleNamespace(_attn_implementation="eager")  # the mask is transformers' own

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(vocab, vocab, bias=False)
            self.head.weight.data = table.t().contiguous()

        def get_decoder(self):
            return lambda input_ids, **kwargs: SimpleNamespace(
                last_hidden_state=torch.nn.functional.one_hot(input_ids, vocab).float())

        def get_output_embeddings(self):
            return self.head

    b = groups_to_batch([_group(0, [([1, 5], [7, 8, 9]), ([3], [6, 2])])])
    got = output_logp(attach_logprobs(TableModel()), b, temperature=0.7, chunk_tokens=2).detach()
    for i, (p, o) in enumerate([([1, 5], [7, 8, 9]), ([3], [6, 2])]):
        seq = p + o
        for t, tok in enumerate(o):
            prev = seq[len(p) - 1 + t]
            want = torch.log_softmax(table[prev] / 0.7, -1)[tok]
            assert float(got[i, t]) == pytest.approx(float(want), abs=1e-6)


class _StandIn(BufferStandIn):
    """Answers BatchRequests from a script of replies (the last one for good)."""

    def __init__(self, address: str, replies: list):
        self.replies, self.requests = list(replies), []
        super().__init__(address)

    def answer(self, m):
        self.requests.append(m)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


def test_batch_source_retries_empty_then_returns_the_batch(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    groups = [_group(0, [([1], [5, 6])]), _group(1, [([1], [7])])]
    stand_in = _StandIn(address, [P.Batch(groups=[], trainer_version=4,
                                          reason="not enough fresh groups")] * 2 +
                        [P.Batch(groups=groups, trainer_version=4)])
    src = BatchSource(address, 2, wait_s=0.1, buffer_timeout_s=10, rank=0)
    try:
        batch = src.next_batch(4)
        assert batch is not None and batch.n_seqs == 2 and src.empty_polls == 2
        assert [g.group_id for g in src.last_groups] == [g.group_id for g in groups]
        assert all(r.n_groups == 2 and r.trainer_version == 4 for r in stand_in.requests)
    finally:
        src.close()
        stand_in.close()


def test_batch_source_stop_and_silent_buffer(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    src = BatchSource(address, 2, wait_s=0.1, buffer_timeout_s=1.0, rank=0,
                      should_stop=lambda: True)
    assert src.next_batch(0) is None  # a requested stop wins before any request
    src.close()
    src = BatchSource(address, 2, wait_s=0.1, buffer_timeout_s=1.0, rank=0)
    t0 = time.monotonic()
    with pytest.raises(BufferUnavailable, match=address.replace(".", r"\.")):
        src.next_batch(0)
    assert time.monotonic() - t0 < 30  # bounded: timeout + one request timeout, not forever
    src.close()
