"""Packed micro-batches on CUDA (``trainer/step.py``'s ``packed_output_logp``): each packed
sequence's log-probs equal that sequence run alone, on the trainer's ``sdpa_packed`` (torch's
``varlen_attn`` kernel in bf16 on CUDA: asserted) and on flash-attention's own variable-length
kernels (``model.attn_implementation=flash_attention_2`` / ``flash_attention_4``; each skips where
its package is not installed: ``flash_attn`` importable is not FA2 where SGLang installed
``flash-attn-4``), in bfloat16 as a GPU job computes. The sequences' boundaries
(``cu_seq_lens_q``) are what keep them apart: run as one sequence, the packed row must differ (the
check that this test can fail). tests/unit/test_packing.py is the CPU twin in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

ATOL = 3e-2  # bf16: one sequence alone and packed take different kernels' rounding
LEAK = 0.1  # a row attending across its sequences moves some log-prob by more than this
DEVICE = "cuda"


def _batch(shapes):
    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    rng = np.random.default_rng(0)
    trajs = [Trajectory.of(prompt_ids=rng.integers(4, 100, p), output_ids=rng.integers(4, 100, o),
                           behav_logp=np.full(o, -1.0), versions=np.zeros(o, np.int32), reward=1.0,
                           finish_reason="stop") for p, o in shapes]
    return groups_to_batch([TrajectoryGroup(group_id="g", server_id="s", lease_id="0",
                                            prompt_index=0, epoch=0, trajectories=trajs)])


@pytest.mark.parametrize("attn", ["sdpa_packed", "flash_attention_2", "flash_attention_4"])
def test_packed_logp_equals_each_sequence_alone_on_cuda(attn):
    import torch

    from areal_like.settings.config import load_config
    from areal_like.weights.hf import build_model
    from trainer.model import attach_logprobs
    from trainer.packed_attention import (
        PACKED_SDPA,
        flash_attention_implementations,
        uses_varlen_kernel,
    )
    from trainer.step import output_logp

    if attn != PACKED_SDPA and attn not in flash_attention_implementations():
        pytest.skip(f"{attn}: its package is not installed")
    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    model = attach_logprobs(build_model(load_config(["model.dtype=bfloat16"]).model)).to(dev)
    model.set_attn_implementation(attn)
    batch = _batch([(30, 60), (50, 20), (20, 70), (7, 3)]).to(dev)
    m = batch.mask > 0
    if attn == PACKED_SDPA:  # the varlen kernel, not the per-length SDPA of CPU and fp32
        assert uses_varlen_kernel(torch.zeros(1, 14, 8, 64, dtype=torch.bfloat16, device=dev))
    with torch.no_grad():
        packed = output_logp(model, batch, 0.8, chunk_tokens=64, packed=True)
        alone = torch.cat([torch.nn.functional.pad(
            output_logp(model, batch.select([i]), 0.8), (0, m.shape[1] - int(batch.output_lens[i])))
            for i in range(batch.n_seqs)])
        torch.testing.assert_close(packed[m], alone[m], rtol=0, atol=ATOL)
        # the same row without its boundaries: the sequences see each other
        joined = output_logp(model, _joined(batch), 0.8, chunk_tokens=64)
    leaked = (joined[0, -int(batch.output_lens[-1]):] - packed[-1, :int(batch.output_lens[-1])])
    assert float(leaked.abs().max()) > LEAK


def _joined(batch):
    """The batch's sequences concatenated into ONE sequence (prompt: all but the last output)."""
    lens = (batch.prompt_lens + batch.output_lens).tolist()
    ids = [int(t) for i, k in enumerate(lens) for t in batch.input_ids[i, :k]]
    last = int(batch.output_lens[-1])
    return _batch_of(ids[:-last], ids[-last:]).to(batch.input_ids.device)


def _batch_of(prompt, output):
    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    traj = Trajectory.of(prompt_ids=np.array(prompt), output_ids=np.array(output),
                         behav_logp=np.full(len(output), -1.0),
                         versions=np.zeros(len(output), np.int32), reward=1.0,
                         finish_reason="stop")
    return groups_to_batch([TrajectoryGroup(group_id="j", server_id="s", lease_id="0",
                                            prompt_index=0, epoch=0, trajectories=[traj])])
